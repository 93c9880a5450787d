"""Data-quality suites run with Great Expectations 1.x, one per stage.

Great Expectations is imported lazily (it takes seconds) and runs on an ephemeral context with its
progress bars off, so the checks add nothing to the logs but their results.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

SAMPLE_ROWS = 5
_context_lock = threading.Lock()
_context: Any = None


@dataclass(frozen=True)
class Expect:
    """One expectation by its Great Expectations class name, e.g. Expect('ExpectColumnValuesToBeUnique', column=...)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __init__(self, name: str, **kwargs: Any) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "kwargs", kwargs)


@dataclass(frozen=True)
class ExpectationOutcome:
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int
    sample: list[Any]


@dataclass(frozen=True)
class QualityResult:
    suite: str
    rows: int
    outcomes: list[ExpectationOutcome]

    @property
    def success(self) -> bool:
        return all(o.success for o in self.outcomes)

    @property
    def unexpected_count(self) -> int:
        return sum(o.unexpected_count for o in self.outcomes)

    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def describe(self) -> str:
        if self.success:
            return f"{self.suite}: all {len(self.outcomes)} expectations met on {self.rows} rows"
        parts = [f"{o.expectation}({o.column}): {o.unexpected_count} unexpected" for o in self.failures()]
        return f"{self.suite}: " + "; ".join(parts)


def validate(suite_name: str, frame: pd.DataFrame, expectations: list[Expect]) -> QualityResult:
    """Run `expectations` over `frame` and return per-expectation outcomes with sample values."""
    import great_expectations as gx

    if frame.empty:
        # Every column expectation holds vacuously on no rows; say so rather than asking GX.
        outcomes = [ExpectationOutcome(e.name, e.kwargs.get("column"), True, 0, []) for e in expectations]
        return QualityResult(suite_name, 0, outcomes)
    with _context_lock:
        context = _gx_context_unlocked()
        source_name = f"recon_{suite_name}"
        try:
            source = context.data_sources.get(source_name)
        except (KeyError, ValueError):
            source = context.data_sources.add_pandas(source_name)
        asset_names = {a.name for a in source.assets}
        asset = source.get_asset(suite_name) if suite_name in asset_names else source.add_dataframe_asset(suite_name)
        definitions = {b.name for b in asset.batch_definitions}
        batch_definition = (
            asset.get_batch_definition("whole")
            if "whole" in definitions
            else asset.add_batch_definition_whole_dataframe("whole")
        )
        batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
        suite = gx.ExpectationSuite(name=suite_name)
        for e in expectations:
            suite.add_expectation(getattr(gx.expectations, e.name)(**e.kwargs))
        result = batch.validate(suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20})
    outcomes = []
    for r in result.results:
        details = r.result or {}
        sample = list(details.get("partial_unexpected_list") or [])[:SAMPLE_ROWS]
        outcomes.append(
            ExpectationOutcome(
                expectation=r.expectation_config.type,
                column=r.expectation_config.kwargs.get("column"),
                success=bool(r.success),
                unexpected_count=int(details.get("unexpected_count") or (0 if r.success else 1)),
                sample=[None if isinstance(v, float) and pd.isna(v) else v for v in sample],
            )
        )
    return QualityResult(suite_name, len(frame), outcomes)


def _gx_context_unlocked() -> Any:
    """The process's one ephemeral GX context (callers hold _context_lock: GX is not thread-safe)."""
    global _context
    if _context is None:
        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        _context = context
    return _context


def combine(suite_name: str, results: list[QualityResult]) -> QualityResult:
    """One result for a suite validated chunk by chunk: an expectation holds if it held on every chunk.

    Expectations across rows (uniqueness) are judged within a chunk only; the staging tables'
    primary keys guarantee them across chunks.
    """
    merged: dict[tuple[str, str | None], ExpectationOutcome] = {}
    for result in results:
        for o in result.outcomes:
            key = (o.expectation, o.column)
            seen = merged.get(key)
            merged[key] = (
                o
                if seen is None
                else ExpectationOutcome(
                    o.expectation,
                    o.column,
                    seen.success and o.success,
                    seen.unexpected_count + o.unexpected_count,
                    (seen.sample + o.sample)[:SAMPLE_ROWS],
                )
            )
    return QualityResult(suite_name, sum(r.rows for r in results), list(merged.values()))
