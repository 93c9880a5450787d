"""The environment a user's shell would give a command: this process's, without any of reconcile's variables."""

from __future__ import annotations

import os

from reconcile.vendors import registry

# Every vendor's URL and secret variable comes from the registry, so a new vendor's are cleared too.
OURS = (
    "RECONCILE_",
    "DAGSTER_HOME",
    *(var for vendor in registry.all_vendors() for var in (vendor.url_var, vendor.secret_var)),
)


def clean_environ() -> dict[str, str]:
    """A copy of os.environ without RECONCILE_*, DAGSTER_HOME and every vendor's URL and secret variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(OURS)}
