"""A vendor simulator (fal, replicate, kie status APIs over real loopback HTTP) and a synthetic
platform population, for tests, demos and benchmarks of reconcile.

    truth -> SimulatorThread / SimulatorProcess / serve -> base URLs + secrets (env())
    generate_population(size, seed, now) -> platform rows + truth + expected outcomes
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported lazily: the vendor modules import `reconcile.simulator.truth` and `.wire` while the registry
# loads, and must not pull in the server (which reads the registry) at that moment.
_EXPORTS = {
    "RequestHook": "reconcile.simulator.app",
    "SimulatorState": "reconcile.simulator.app",
    "create_app": "reconcile.simulator.app",
    "DEFAULT_SECRETS": "reconcile.simulator.knobs",
    "VendorKnobs": "reconcile.simulator.knobs",
    "build_knobs": "reconcile.simulator.knobs",
    "Expected": "reconcile.simulator.population",
    "Population": "reconcile.simulator.population",
    "generate_population": "reconcile.simulator.population",
    "write_population": "reconcile.simulator.population",
    "SimulatorProcess": "reconcile.simulator.server",
    "SimulatorThread": "reconcile.simulator.server",
    "serve": "reconcile.simulator.server",
    "MemoryTruthStore": "reconcile.simulator.truth",
    "Outcome": "reconcile.simulator.truth",
    "SqliteTruthStore": "reconcile.simulator.truth",
    "TaskTruth": "reconcile.simulator.truth",
    "TruthStore": "reconcile.simulator.truth",
    "load_truth": "reconcile.simulator.truth",
    "open_truth": "reconcile.simulator.truth",
    "save_truth": "reconcile.simulator.truth",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'reconcile.simulator' has no attribute {name!r}")
