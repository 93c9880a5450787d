"""The HTTP side of asking a vendor: one client for a vendor's whole run, one exchange per request.

`open_client` opens an aiohttp session ('aiohttp') or an httpx client ('httpx', or an httpx transport
instance such as a test's MockTransport); `HttpClient.exchange` sends one `VendorRequest` and reads its
answer, the body bounded. Failures are raised as they come (`TRANSPORT_ERRORS`, `BodyTooLarge`): what
they mean for the job is the fetch engine's business (`failure_reason` names them).
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from urllib.parse import urlencode

import aiohttp
import httpx

from reconcile.vendors.base import RawAnswer, VendorRequest

TRANSPORTS = ("aiohttp", "httpx")
# Measured on the 2-core dev machine, one vendor, 4,000 jobs, concurrency 32, simulator in its own
# process answering after 20 ms: httpx's own transport 170-200 req/s (client CPU-bound, httpcore's
# pool: httpx issue #3215), httpx over aiohttp (httpx-aiohttp) 800-930 req/s. The vendor stage is
# client-CPU bound, so 'aiohttp' uses an aiohttp.ClientSession directly: per request, httpx's
# Request/URL/Headers/cookies layer plus httpx-aiohttp's wrapping cost 0.5 ms of CPU, aiohttp alone
# 0.18 ms. 'httpx' (or an httpx transport instance, e.g. a test's MockTransport) goes through httpx.
DEFAULT_TRANSPORT = "aiohttp"

USER_AGENT = "reconcile/0.1 (+credit reconciliation)"

# What a failed exchange raises, whichever the client (BodyTooLarge aside).
TRANSPORT_ERRORS = (httpx.HTTPError, aiohttp.ClientError, OSError, TimeoutError)


class BodyTooLarge(Exception):
    pass


def transport_name(transport: str | httpx.AsyncBaseTransport) -> str:
    return transport if isinstance(transport, str) else type(transport).__name__


def failure_reason(exc: BaseException) -> str:
    """'timeout' or 'connection_error' for a transport failure (aiohttp's timeouts are TimeoutErrors;
    an httpx error wrapping an aiohttp one, e.g. httpx-aiohttp's ConnectTimeout for a refused
    connection, is judged by its cause)."""
    cause = exc.__cause__
    if cause is not None and type(cause).__module__.startswith("aiohttp"):
        exc = cause
    return "timeout" if isinstance(exc, httpx.TimeoutException | TimeoutError) else "connection_error"


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """httpx's default context (its CA bundle), made once: loading the bundle takes ~30 ms."""
    return httpx.create_ssl_context()


class HttpClient(ABC):
    """One open HTTP client, for one vendor's run."""

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes

    @abstractmethod
    async def exchange(self, request: VendorRequest) -> RawAnswer:
        """The answer to `request`; raises TRANSPORT_ERRORS, or BodyTooLarge past `max_body_bytes`."""

    async def _read_capped(self, chunks: AsyncIterator[bytes]) -> bytes:
        """The body (decoded), or BodyTooLarge as soon as it passes `max_body_bytes`."""
        parts: list[bytes] = []
        size = 0
        async for chunk in chunks:
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge
            parts.append(chunk)
        return b"".join(parts)


class _AiohttpClient(HttpClient):
    def __init__(self, session: aiohttp.ClientSession, max_body_bytes: int) -> None:
        super().__init__(max_body_bytes)
        self._session = session

    async def exchange(self, request: VendorRequest) -> RawAnswer:
        # The query encoded as httpx encodes `params` (urlencode), so both transports send one URL.
        url = f"{request.url}?{urlencode(request.params)}" if request.params else request.url
        async with self._session.request(
            request.method,
            url,
            headers=request.headers,
            allow_redirects=False,  # a redirect must never carry the secret elsewhere
        ) as response:
            body = await self._read_capped(response.content.iter_any())
            # lower-case names, like httpx's headers (parsers look names up case-insensitively anyway)
            headers = {name.lower(): value for name, value in response.headers.items()}
            return RawAnswer(response.status, headers, body)


class _HttpxClient(HttpClient):
    def __init__(self, client: httpx.AsyncClient, max_body_bytes: int) -> None:
        super().__init__(max_body_bytes)
        self._client = client

    async def exchange(self, request: VendorRequest) -> RawAnswer:
        async with self._client.stream(
            request.method, request.url, params=request.params or None, headers=dict(request.headers)
        ) as response:
            body = await self._read_capped(response.aiter_bytes())
            return RawAnswer(response.status_code, dict(response.headers), body)


@contextlib.asynccontextmanager
async def open_client(
    transport: str | httpx.AsyncBaseTransport, concurrency: int, timeout: float, max_body_bytes: int
) -> AsyncIterator[HttpClient]:
    """One HTTP client for a vendor's whole run, at most `concurrency` connections, every phase of an
    exchange (pool wait and connect, connect, read) bounded by `timeout` seconds."""
    if transport == "aiohttp":
        session = aiohttp.ClientSession(
            # httpx's CA bundle and keep-alive expiry, as before with httpx over aiohttp
            connector=aiohttp.TCPConnector(limit=concurrency, ssl=_ssl_context(), keepalive_timeout=5.0),
            timeout=aiohttp.ClientTimeout(connect=timeout, sock_connect=timeout, sock_read=timeout),
            headers={"User-Agent": USER_AGENT},
        )
        async with session:
            yield _AiohttpClient(session, max_body_bytes)
        return
    if not isinstance(transport, httpx.AsyncBaseTransport):  # 'httpx' (names are checked up front)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        transport = httpx.AsyncHTTPTransport(limits=limits, retries=0)
    client = httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,  # a redirect must never carry the secret elsewhere
        headers={"User-Agent": USER_AGENT},
    )
    async with client:
        yield _HttpxClient(client, max_body_bytes)
