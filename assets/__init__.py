"""The thin Dagster layer over `reconcile`: assets, checks and resources of the reconciliation pass."""
