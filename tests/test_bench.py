"""The benchmark as the README has a user run it (`python bench/run.py --quick`), black box, from another
directory: one cheap section end to end on the local PostgreSQL, and its failures in one line each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import POSTGRES_ADMIN_URL, require_postgres
from tests.environ import clean_environ

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "bench" / "run.py"


def _bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *args],
        env=env or clean_environ(),
        cwd="/",
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_quick_refunds_section_prints_its_figures_and_writes_them_as_json(tmp_path: Path) -> None:
    """The figures a section measures, each a `name: value` line on stdout and in the JSON with its goal;
    how fast they are is the benchmark's business, not this test's."""
    require_postgres()
    out = tmp_path / "figures.json"
    run = _bench("--quick", "--only", "refunds", "--postgres-url", POSTGRES_ADMIN_URL, "--json", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    printed = dict(line.split(": ", 1) for line in run.stdout.splitlines() if ": " in line)
    assert printed["mode"] == "quick"
    for name in ("refund_batch_vs_rowwise", "refunds_batch_per_second", "refunds_rowwise_per_second"):
        assert float(printed[name]) > 0
    figures = {f["name"]: f for f in json.loads(out.read_text())["figures"]}
    assert figures["refund_batch_vs_rowwise"]["goal"] == ">= 10"
    assert figures["refund_batch_vs_rowwise"]["met"] in (True, False)


def test_an_unknown_section_is_refused_naming_the_sections() -> None:
    run = _bench("--quick", "--only", "refundz")
    assert run.returncode == 2
    assert "unknown section(s) ['refundz']" in run.stderr and "'refunds'" in run.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://bench:s3cret-pw@127.0.0.1:1/x",  # nothing listens there
        "postgresql+psycopg://bench:s3cret@pw@127.0.0.1:1/x",  # an unescaped '@': the host would repeat 'pw@...'
        "postgresql+psycopg://bench:s3cret-pw@127.0.0.1:port/x",  # not a URL SQLAlchemy parses
        "postgresql+psycopg://127.0.0.1:1/x?password=s3cret-pw",  # libpq's password parameter
    ],
)
def test_an_unusable_server_url_stops_in_one_line_without_its_password(url: str) -> None:
    run = _bench("--quick", "--only", "refunds", "--postgres-url", url)
    assert run.returncode == 2
    assert run.stderr.startswith("error: PostgreSQL is not reachable at postgresql+psycopg://")
    assert "--postgres-url" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert "s3cret" not in run.stdout + run.stderr and "pw@" not in run.stderr
