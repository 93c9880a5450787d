"""One settings object, read from the environment with the contract's names, validated loudly.

Every run reads the environment afresh (no cached, hot-reloaded copy: see the background incident
where a reload with a missing field silently kept old values). Every problem is reported at once,
each naming the variable and the exact fix, instead of the first one only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, create_model, field_validator

from reconcile.vendors import registry

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The embedded default's files (SQLite database, demo truth, Dagster home): the checkout's .reconcile/,
# or RECONCILE_STATE_DIR where the code is installed read-only (the container image sets it).
STATE_DIR = Path(os.environ.get("RECONCILE_STATE_DIR") or PROJECT_ROOT / ".reconcile")
DEFAULT_DATABASE_URL = f"sqlite:///{STATE_DIR / 'platform.db'}"
DEFAULT_REPORTS_DIR = STATE_DIR / "reports"


@dataclass(frozen=True)
class VendorEnv:
    """The environment names of one vendor (from its module), and its settings fields' names.

    The naming rule is written here only: the settings field of a vendor's base URL is
    `<vendor>_base_url`, of its secret `<vendor>_secret`; each field's alias is the vendor's own
    environment variable (`Vendor.url_var`, `Vendor.secret_var`).
    """

    vendor: str
    url_var: str
    default_url: str
    secret_var: str
    default_rate: float | None = None  # the vendor module's `default_rate_per_second`

    @property
    def rate_var(self) -> str:
        """reconcile's own variable for this vendor's request rate."""
        return f"RECONCILE_{self.vendor.upper()}_RATE_LIMIT_PER_SECOND"

    @property
    def rate_field(self) -> str:
        return f"{self.vendor}_rate_limit_per_second"

    @property
    def url_field(self) -> str:
        return f"{self.vendor}_base_url"

    @property
    def secret_field(self) -> str:
        return f"{self.vendor}_secret"


VENDOR_ENV: dict[str, VendorEnv] = {
    v.name: VendorEnv(v.name, v.url_var, v.default_url, v.secret_var, v.default_rate_per_second)
    for v in registry.all_vendors()
}
VENDORS: tuple[str, ...] = tuple(VENDOR_ENV)


def _check_http_url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError("must be a base URL without a query string or fragment")
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError:
        raise ValueError("has a port that is not a number from 0 to 65535") from None
    return value.rstrip("/")


class _CoreSettings(BaseModel):
    """The configuration that is not any one vendor's (the vendors' fields are added below)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    database_url: str = Field(DEFAULT_DATABASE_URL, alias="RECONCILE_DATABASE_URL", min_length=1)
    stuck_after_minutes: int = Field(30, alias="RECONCILE_STUCK_AFTER_MINUTES", gt=0, le=60 * 24 * 30)
    undispatched_fail_after_minutes: int = Field(
        120, alias="RECONCILE_UNDISPATCHED_FAIL_AFTER_MINUTES", gt=0, le=60 * 24 * 30
    )
    refund_lookback_hours: int = Field(24 * 7, alias="RECONCILE_REFUND_LOOKBACK_HOURS", gt=0)
    full_audit_every_hours: int = Field(24, alias="RECONCILE_FULL_AUDIT_EVERY_HOURS", gt=0)
    # A pass renews its lease 4 times per period while it works; a crashed pass's lease is taken over
    # at once when its process or Dagster run is provably gone, else after this long.
    lease_seconds: int = Field(60, alias="RECONCILE_LEASE_SECONDS", gt=0, le=3600)
    # `reconcile run` waits this long for a database that is starting up (connection refused, ...).
    database_wait_seconds: int = Field(60, alias="RECONCILE_DATABASE_WAIT_SECONDS", ge=0, le=3600)
    # Observation metrics older than this are purged by the metrics step (the method needs 48 h).
    metrics_retention_days: int = Field(7, alias="RECONCILE_METRICS_RETENTION_DAYS", ge=3, le=3650)
    # Bounds one pass's memory and vendor calls after an incident; the oldest stuck jobs go first.
    max_jobs_per_pass: int = Field(50_000, alias="RECONCILE_MAX_JOBS_PER_PASS", gt=0)
    # The most stuck jobs any step holds in memory at once: the pass reads its working set back
    # from the database in chunks of this many, by key range.
    chunk_size: int = Field(10_000, alias="RECONCILE_CHUNK_SIZE", gt=0, le=1_000_000)
    # A local directory or an fsspec URL (s3://bucket/prefix, gs://...): where reports and books go.
    reports_dir: str = Field(str(DEFAULT_REPORTS_DIR), alias="RECONCILE_REPORTS_DIR", min_length=1)
    # Finance's books: the business day's time zone, and the first day the partitions offer to build.
    business_timezone: str = Field("UTC", alias="RECONCILE_BUSINESS_TIMEZONE")
    books_start_date: str = Field("2026-01-01", alias="RECONCILE_BOOKS_START_DATE", pattern=r"^\d{4}-\d{2}-\d{2}$")
    # Refund holds (reconcile/refunds.py): planned but written only once a person approves them.
    refund_hold_above_credits: int = Field(1_000, alias="RECONCILE_REFUND_HOLD_ABOVE_CREDITS", gt=0)
    # The mass-failure guard: a vendor whose refunds in one pass exceed a limit, or jump far above its
    # usual level, has all of that pass's refunds held. On by default.
    refund_mass_failure_guard: bool = Field(True, alias="RECONCILE_REFUND_MASS_FAILURE_GUARD")
    refund_hold_vendor_pass_refunds: int = Field(500, alias="RECONCILE_REFUND_HOLD_VENDOR_PASS_REFUNDS", gt=0)
    refund_hold_vendor_jump_factor: float = Field(10.0, alias="RECONCILE_REFUND_HOLD_VENDOR_JUMP_FACTOR", gt=1)
    refund_hold_vendor_jump_min: int = Field(50, alias="RECONCILE_REFUND_HOLD_VENDOR_JUMP_MIN", gt=0)
    alert_webhook_url: SecretStr | None = Field(None, alias="RECONCILE_ALERT_WEBHOOK_URL")
    alert_stuck_warning_threshold: int = Field(
        100, alias="RECONCILE_ALERT_STUCK_WARNING_THRESHOLD", gt=0, le=10_000_000
    )
    alert_refund_spike_factor: float = Field(5.0, alias="RECONCILE_ALERT_REFUND_SPIKE_FACTOR", gt=1, le=1000)
    alert_refund_spike_min: int = Field(20, alias="RECONCILE_ALERT_REFUND_SPIKE_MIN", gt=0, le=10_000_000)
    alert_metrics_stale_minutes: int = Field(60, alias="RECONCILE_ALERT_METRICS_STALE_MINUTES", gt=0, le=60 * 24 * 7)

    vendor_concurrency: int = Field(32, alias="RECONCILE_VENDOR_CONCURRENCY", gt=0, le=1024)
    vendor_rate_limit_per_second: float = Field(50.0, alias="RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND", gt=0, le=100_000)
    vendor_timeout_seconds: float = Field(10.0, alias="RECONCILE_VENDOR_TIMEOUT_SECONDS", gt=0, le=600)
    vendor_max_attempts: int = Field(4, alias="RECONCILE_VENDOR_MAX_ATTEMPTS", gt=0, le=20)
    # The vendors' steps run side by side: 600 s of asking each, plus the rest of the pass, fits the 15-minute
    # tick, so an incident drains within one pass of the vendors' own limit (bench: ticks_to_drain).
    vendor_time_budget_seconds: float = Field(600.0, alias="RECONCILE_VENDOR_TIME_BUDGET_SECONDS", gt=0, le=3600)
    vendor_outage_error_share: float = Field(0.5, alias="RECONCILE_VENDOR_OUTAGE_ERROR_SHARE", gt=0, le=1)

    @field_validator("alert_webhook_url")
    @classmethod
    def _webhook_url(cls, value: SecretStr | None) -> SecretStr | None:
        # The webhook URL of Slack carries its token in the path: held as a secret, checked as a URL.
        if value is not None:
            _check_http_url(value.get_secret_value())
        return value

    @field_validator("business_timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError("must be a time zone name such as UTC or Europe/Berlin") from exc
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except (ArgumentError, ValueError) as exc:
            # Never the parser's own text: it can quote the password (e.g. a non-numeric port).
            raise ValueError(
                "is not a SQLAlchemy URL such as postgresql+psycopg://user@host:5432/db: check that the port "
                "is a number and that special characters of the password are %-escaped"
            ) from exc
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError("must point at PostgreSQL or SQLite")
        return value

    def vendor_url(self, vendor: str) -> str:
        return getattr(self, _vendor_env(vendor).url_field)

    def vendor_secret(self, vendor: str) -> SecretStr | None:
        return getattr(self, _vendor_env(vendor).secret_field)

    def vendor_rate(self, vendor: str) -> float:
        """Requests a second to `vendor`: its own RECONCILE_<VENDOR>_RATE_LIMIT_PER_SECOND; unset, the
        global RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND when that is set; else the vendor module's default
        (Replicate's leaves most of the account's read limit to the platform), or the global default."""
        env = _vendor_env(vendor)
        own = getattr(self, env.rate_field)
        if own is not None:
            return own
        if env.default_rate is None or "vendor_rate_limit_per_second" in self.model_fields_set:
            return self.vendor_rate_limit_per_second
        return env.default_rate

    def redacted(self) -> dict[str, Any]:
        """Every setting by its environment name; secrets only as 'set' / 'unset'."""
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if isinstance(value, SecretStr) or name in _SECRET_FIELDS:
                out[field.alias] = "set" if value is not None else "unset"
            elif name == "database_url":
                out[field.alias] = redact_url(value)
            elif isinstance(value, str):
                out[field.alias] = mask_credentials(value)  # e.g. a vendor URL with user:password@
            else:
                out[field.alias] = str(value) if isinstance(value, Path) else value
        return out

    def config_hash(self) -> str:
        """A short, stable fingerprint of the redacted configuration, for run metadata."""
        blob = json.dumps(self.redacted(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _vendor_env(vendor: str) -> VendorEnv:
    try:
        return VENDOR_ENV[vendor]
    except KeyError:
        raise registry.UnknownVendor(vendor) from None


def _checked_vendor_url(value: str) -> str:
    return _check_http_url(value)  # type: ignore[return-value]


# One base-URL field and one secret field per registered vendor, named by VendorEnv's rule.
_VENDOR_FIELDS: dict[str, Any] = {}
for _env in VENDOR_ENV.values():
    _VENDOR_FIELDS[_env.url_field] = (str, Field(_env.default_url, alias=_env.url_var))
    _VENDOR_FIELDS[_env.secret_field] = (SecretStr | None, Field(None, alias=_env.secret_var))
    _VENDOR_FIELDS[_env.rate_field] = (float | None, Field(None, alias=_env.rate_var, gt=0, le=100_000))

Settings = create_model(
    "Settings",
    __base__=_CoreSettings,
    __doc__="The effective configuration of one reconcile process (every vendor's fields included).",
    __validators__={"_vendor_urls": field_validator(*(e.url_field for e in VENDOR_ENV.values()))(_checked_vendor_url)},
    **_VENDOR_FIELDS,
)

_SECRET_FIELDS = {"alert_webhook_url", *(e.secret_field for e in VENDOR_ENV.values())}


_SENSITIVE_KEY = re.compile("pass|secret|token|key", re.IGNORECASE)


def redact_url(url: str) -> str:
    """A database URL with its password hidden (a URL SQLAlchemy cannot parse: its credentials masked)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        # A password can also travel as a query parameter (`?password=...`, libpq's conninfo keys).
        query = {k: ("redacted" if _SENSITIVE_KEY.search(k) else v) for k, v in parsed.query.items()}
        return parsed.set(query=query).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - any malformed URL: shown with its credentials masked instead
        return mask_credentials(url)


def database_label(url: str) -> str:
    """Which database a run works on, for its tags and its Dagster home: backend, host, port and name;
    never the user nor the password."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"sqlite:{parsed.database or ':memory:'}"
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.get_backend_name()}://{parsed.host or 'localhost'}{port}/{parsed.database or ''}"


def mask_credentials(text: str) -> str:
    """`text` with whatever may be a credential masked, whatever its shape: the user information of a
    URL (everything before the last '@', so a password holding '@', '/' or ':' unescaped is covered too,
    with or without a scheme or a host) and the query string and fragment (`?password=...`)."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    if "@" in rest:
        rest = "***@" + rest[rest.rfind("@") + 1 :]
    for mark in "?#":
        if mark in rest:
            rest = rest.split(mark, 1)[0] + f"{mark}***"
    return scheme + sep + rest


@dataclass(frozen=True)
class Problem:
    variable: str
    message: str
    fix: str
    fatal: bool = True  # False: the run can go on without it (e.g. one vendor's secret)

    def __str__(self) -> str:
        return f"{self.variable} {self.message}: {self.fix}"


class ConfigError(Exception):
    """Raised when the environment cannot make a valid configuration; lists every problem."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"reconcile is misconfigured ({len(problems)} problem(s)):\n{lines}\n"
            "Run `reconcile check-config` to see the whole configuration."
        )


def _field_by_alias() -> dict[str, str]:
    return {f.alias: name for name, f in Settings.model_fields.items() if f.alias}


def _raw_from_env(environ: Mapping[str, str]) -> dict[str, str]:
    raw = {}
    for alias in _field_by_alias():
        value = environ.get(alias)
        # An empty variable is treated as unset: `FAL_KEY=` must not count as a configured secret.
        if value is not None and value.strip() != "":
            raw[alias] = value.strip()
    return raw


def _default_hint(alias: str) -> str:
    field = Settings.model_fields[_field_by_alias()[alias]]
    if field.default is None:
        return f"export {alias}=..."
    return f"export {alias}=<valid value> (or unset it for the default {field.default})"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from the environment; raise ConfigError listing every invalid value."""
    env = os.environ if environ is None else environ
    raw = _raw_from_env(env)
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            alias = str(err["loc"][0]) if err["loc"] else "configuration"
            value = raw.get(alias, "")
            shown = "<hidden>" if alias in _SECRET_ALIASES else repr(mask_credentials(value))[:80]
            reason = err["msg"].removeprefix("Value error, ")  # the validators never quote the value
            problems.append(Problem(alias, f"is {shown}, which is invalid ({reason})", _default_hint(alias)))
        raise ConfigError(problems) from None


_SECRET_ALIASES = {Settings.model_fields[n].alias for n in _SECRET_FIELDS}


def missing_secret_problems(
    environ: Mapping[str, str] | None = None, in_use: Collection[str] | None = None
) -> list[Problem]:
    """One non-fatal problem per vendor that matters and whose secret is unset: its jobs cannot be reconciled.

    The rule ("configured vendors only"): a vendor matters when the platform has open dispatched jobs of
    it (`in_use`, from `reconcile.vendor_stage.vendors_in_use`) or when its base URL variable is set (a
    half-done configuration). A vendor with neither is not the platform's: nobody is told its secret is
    missing. With `in_use=None` (the database could not tell) every vendor without a secret is reported.
    """
    raw = _raw_from_env(os.environ if environ is None else environ)
    problems = []
    for vendor, names in VENDOR_ENV.items():
        matters = in_use is None or vendor in in_use or names.url_var in raw
        if matters and names.secret_var not in raw:
            problems.append(
                Problem(
                    names.secret_var,
                    "is not set",
                    f"export {names.secret_var}=... ({vendor} jobs cannot be reconciled)",
                    fatal=False,
                )
            )
    return problems
