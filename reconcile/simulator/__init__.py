"""A vendor simulator (fal, replicate, kie status APIs over real loopback HTTP) and a synthetic
platform population, for tests, demos and benchmarks of reconcile.

    truth -> SimulatorThread / SimulatorProcess / serve -> base URLs + secrets (env())
    generate_population(size, seed, now) -> platform rows + truth + expected outcomes
"""

from reconcile.simulator.app import RequestHook, SimulatorState, create_app
from reconcile.simulator.knobs import DEFAULT_SECRETS, VendorKnobs, build_knobs
from reconcile.simulator.population import Expected, Population, generate_population, write_population
from reconcile.simulator.server import SimulatorProcess, SimulatorThread, serve
from reconcile.simulator.truth import (
    MemoryTruthStore,
    Outcome,
    SqliteTruthStore,
    TaskTruth,
    TruthStore,
    load_truth,
    open_truth,
    save_truth,
)

__all__ = [
    "DEFAULT_SECRETS",
    "Expected",
    "MemoryTruthStore",
    "Outcome",
    "Population",
    "RequestHook",
    "SimulatorProcess",
    "SimulatorState",
    "SimulatorThread",
    "SqliteTruthStore",
    "TaskTruth",
    "TruthStore",
    "VendorKnobs",
    "build_knobs",
    "create_app",
    "generate_population",
    "load_truth",
    "open_truth",
    "save_truth",
    "serve",
    "write_population",
]
