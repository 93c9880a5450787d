"""Sensors of the reconciliation pass: what happens when a run fails, and (later) tiered alerts."""
