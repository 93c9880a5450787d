"""Where report files go: a local directory, or an object store named by an fsspec URL
(RECONCILE_REPORTS_DIR=s3://bucket/prefix, gs://..., memory://...).

Local files are replaced atomically (written aside, then renamed); an object-store object is
written whole by one PUT when its file closes, so a reader never sees half a report either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

Writer = Callable[[TextIO], object]


def is_url(target: str | Path) -> bool:
    return "://" in str(target) and not str(target).startswith("file://")


def join(target: str | Path, *parts: str) -> str:
    if is_url(target):
        return "/".join([str(target).rstrip("/"), *parts])
    return str(Path(target).resolve().joinpath(*parts))


def write_file(path: str, write: Writer, encoding: str) -> str:
    """Write one file at `path` (local path or URL) with `write`; return where it went."""
    if is_url(path):
        import fsspec

        with fsspec.open(path, "w", encoding=encoding, newline="") as out:
            write(out)
        return path
    local = Path(path)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding=encoding, newline="") as out:
        write(out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, local)
    return str(local)


def read_text(path: str, encoding: str = "utf-8") -> str:
    if is_url(path):
        import fsspec

        with fsspec.open(path, "r", encoding=encoding) as f:
            return f.read()
    return Path(path).read_text(encoding=encoding)
