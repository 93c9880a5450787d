"""reconcile: find stuck AI-generation jobs, ask the vendors for the truth, sync it, refund exactly once,
and report credit leakage.

This package is the domain library: plain functions and small classes, no Dagster imports except in
`reconcile.definitions`, which assembles the Dagster objects from `assets/` and `sensors/`.
"""
