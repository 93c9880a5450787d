"""The vendor registry: every vendor reconcile knows, each defined by one module.

Built-in vendors are the modules of the `reconcile.vendors` package, found by listing it: every module
but the infrastructure (`INFRASTRUCTURE`: base, fetch, registry) and private ones (`_name`) is a vendor
module and must define `VENDOR`, a `reconcile.vendors.base.Vendor` whose `name` is the module's name.
Adding a built-in vendor is adding its module; nothing else is edited. A platform adds its own vendor
from its own package through the entry point group `reconcile.vendors` (README, "How to add a vendor"):

    [project.entry-points."reconcile.vendors"]
    acme = "acme_reconcile.vendor:VENDOR"

The entry point's name must equal the vendor's `name` (the platform's `vendor` column value).

Everything vendor-specific elsewhere derives from here: the settings' fields, `check-config`, the
fetch engine, the Dagster steps (`step_name`), the simulator, the population, the k8s run config and
the token prefixes redaction hides (`token_prefixes`).
An unknown vendor name raises `UnknownVendor` (a KeyError): nothing ever falls into another vendor.
"""

from __future__ import annotations

import functools
import importlib
import logging
import pkgutil
from importlib.metadata import entry_points

from reconcile.vendors.base import Vendor

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "reconcile.vendors"
INFRASTRUCTURE = frozenset({"base", "fetch", "registry"})
STEP_PREFIX = "vendor_statuses_"
SYNC_STEP_PREFIX = "job_status_sync_"


class UnknownVendor(KeyError):
    """A vendor name no module defines."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown vendor {self.name!r}; vendors: {', '.join(names())}"


class VendorRegistryError(RuntimeError):
    """A vendor module or entry point that cannot be used (it names the module and the fix)."""


def _check(vendor: object, source: str, expected_name: str | None = None) -> Vendor:
    if not isinstance(vendor, Vendor):
        raise VendorRegistryError(f"{source} is not a reconcile.vendors.base.Vendor (got {type(vendor).__name__})")
    if expected_name is not None and vendor.name != expected_name:
        raise VendorRegistryError(
            f"{source} defines vendor {vendor.name!r} under the entry point name {expected_name!r}: "
            "name the entry point after the vendor"
        )
    return vendor


def builtin_modules() -> tuple[str, ...]:
    """The vendor modules of the reconcile.vendors package, by name."""
    package = importlib.import_module("reconcile.vendors")
    names = (m.name for m in pkgutil.iter_modules(package.__path__) if not m.ispkg)
    return tuple(sorted(f"reconcile.vendors.{n}" for n in names if n not in INFRASTRUCTURE and not n.startswith("_")))


@functools.cache
def _vendors() -> dict[str, Vendor]:
    found: dict[str, Vendor] = {}
    for module_name in builtin_modules():
        source = f"{module_name}.VENDOR"
        vendor = _check(getattr(importlib.import_module(module_name), "VENDOR", None), source)
        if vendor.name != module_name.rsplit(".", 1)[1]:
            raise VendorRegistryError(f"{source} is named {vendor.name!r}: a vendor module is named after its vendor")
        found[vendor.name] = vendor
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        source = f"entry point {point.name!r} ({point.value}) of group {ENTRY_POINT_GROUP!r}"
        try:
            loaded = point.load()
        except Exception as exc:
            raise VendorRegistryError(f"{source} cannot be loaded: {type(exc).__name__}: {exc}") from exc
        vendor = _check(loaded, source, point.name)
        if vendor.name in found:
            raise VendorRegistryError(f"{source} defines vendor {vendor.name!r}, which is already defined")
        found[vendor.name] = vendor
        log.debug("vendor %s added by %s", vendor.name, source)
    return found


def all_vendors() -> tuple[Vendor, ...]:
    """Every vendor, built-in first (by module name), then entry points by name."""
    return tuple(_vendors().values())


def names() -> tuple[str, ...]:
    return tuple(_vendors())


def get(name: str) -> Vendor:
    """The vendor called `name`; UnknownVendor (a KeyError) if no module defines it."""
    try:
        return _vendors()[name]
    except KeyError:
        raise UnknownVendor(name) from None


def is_known(name: object) -> bool:
    return isinstance(name, str) and name in _vendors()


def step_name(vendor: str) -> str:
    """The Dagster asset (and step) name of a vendor's status stage: the one place it is built."""
    return STEP_PREFIX + get(vendor).name


def sync_step_name(vendor: str) -> str:
    """The Dagster asset (and step) name of the sync of a vendor's jobs: the one place it is built."""
    return SYNC_STEP_PREFIX + get(vendor).name


def token_prefixes() -> tuple[str, ...]:
    """How the vendors' API tokens begin (each vendor's `token_prefixes`), for `base.redact()`."""
    return tuple(sorted({prefix for vendor in _vendors().values() for prefix in vendor.token_prefixes}))


def simulated() -> tuple[Vendor, ...]:
    """The vendors the built-in simulator can play."""
    return tuple(v for v in _vendors().values() if v.simulator is not None)


def populated() -> tuple[Vendor, ...]:
    """The vendors the synthetic population makes jobs of."""
    return tuple(v for v in _vendors().values() if v.population is not None and v.simulator is not None)
