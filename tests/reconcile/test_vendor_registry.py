"""The vendor registry: every vendor-specific part of reconcile derives from it, and an unknown vendor
fails loudly everywhere instead of falling into another vendor's branch."""

from __future__ import annotations

import dataclasses

import pytest

from reconcile.models import JobRef
from reconcile.settings import VENDOR_ENV, VENDORS, Settings, load_settings, missing_secret_problems
from reconcile.simulator import render
from reconcile.simulator.knobs import DEFAULT_SECRETS, build_knobs
from reconcile.simulator.server import base_urls_for, env_for
from reconcile.simulator.truth import Outcome, TaskTruth
from reconcile.vendors import registry
from reconcile.vendors.base import PopulationHints, Vendor

BUILTIN = ("fal", "replicate", "kie")


def test_builtin_vendors_are_registered_each_from_its_own_module() -> None:
    modules = {m.rsplit(".", 1)[1] for m in registry.builtin_modules()}
    assert set(BUILTIN) <= modules <= set(registry.names())  # found by listing the package
    assert not modules & registry.INFRASTRUCTURE
    for name in BUILTIN:
        vendor = registry.get(name)
        assert isinstance(vendor, Vendor) and vendor.name == name
        assert vendor.parse_status.__module__ == f"reconcile.vendors.{name}"


@pytest.mark.parametrize(
    "call",
    [
        lambda: registry.get("midjourney"),
        lambda: registry.step_name("midjourney"),
        lambda: load_settings({}).vendor_url("midjourney"),
        lambda: load_settings({}).vendor_secret("midjourney"),
        lambda: render.not_found("midjourney"),
        lambda: render.unauthorized("midjourney"),
        lambda: render.throttled("midjourney"),
        lambda: render.server_error("midjourney", 500),
    ],
)
def test_an_unknown_vendor_raises_everywhere(call) -> None:
    with pytest.raises(registry.UnknownVendor, match="unknown vendor 'midjourney'"):
        call()


def test_an_unknown_vendor_is_refused_by_the_simulator() -> None:
    with pytest.raises(ValueError, match="unknown vendor 'midjourney'"):
        TaskTruth("midjourney", "t1", "m", Outcome.RUNNING)
    with pytest.raises(ValueError, match="unknown vendor 'midjourney'"):
        build_knobs({"midjourney": {"latency_ms": 1}})


def test_settings_have_one_url_and_one_secret_per_vendor_named_by_its_module() -> None:
    assert registry.names() == VENDORS
    env = {}
    for vendor in registry.all_vendors():
        env[vendor.url_var] = f"https://{vendor.name}.example.test/base/"
        env[vendor.secret_var] = f"secret-of-{vendor.name}"
    settings = load_settings(env)
    for vendor in registry.all_vendors():
        assert settings.vendor_url(vendor.name) == f"https://{vendor.name}.example.test/base"
        assert settings.vendor_secret(vendor.name).get_secret_value() == f"secret-of-{vendor.name}"
        assert settings.redacted()[vendor.secret_var] == "set"
        assert VENDOR_ENV[vendor.name].url_var == vendor.url_var
        assert Settings().vendor_url(vendor.name) == vendor.default_url.rstrip("/")
    assert {p.variable for p in missing_secret_problems({})} == {v.secret_var for v in registry.all_vendors()}


def test_a_vendor_url_is_validated_like_every_other(tmp_path) -> None:
    from reconcile.settings import ConfigError

    for vendor in registry.all_vendors():
        with pytest.raises(ConfigError, match=vendor.url_var):
            load_settings({vendor.url_var: "ftp://nowhere"})


def test_the_simulator_serves_every_simulated_vendor_with_its_own_names() -> None:
    simulated = [v.name for v in registry.simulated()]
    assert set(BUILTIN) <= set(simulated)
    assert set(DEFAULT_SECRETS) == set(simulated)
    urls = base_urls_for("127.0.0.1", 9)
    env = env_for(urls, DEFAULT_SECRETS)
    for vendor in registry.simulated():
        assert urls[vendor.name] == f"http://127.0.0.1:9/{vendor.name}"
        assert env[vendor.url_var] == urls[vendor.name] and env[vendor.secret_var] == DEFAULT_SECRETS[vendor.name]


def test_status_requests_carry_the_vendors_own_headers() -> None:
    for vendor in registry.all_vendors():
        hints = vendor.population
        assert isinstance(hints, PopulationHints)
        job = JobRef("j1", vendor.name, hints.models[0][0], "task-1")
        request = vendor.status_request(job, vendor.default_url, "s3cret", "run:j1")
        assert request.url.startswith(vendor.default_url.rstrip("/") + "/")
        assert request.headers["Authorization"] == f"{vendor.auth_scheme} s3cret"
        assert request.headers["X-Request-Id"] == "run:j1"
        assert all(request.headers[k] == v for k, v in vendor.extra_headers.items())
        assert "s3cret" not in repr(request)


def test_the_assets_of_each_vendor_are_named_in_one_place() -> None:
    from assets.reconciliation import STATUS_SYNC_ASSETS, VENDOR_STATUS_ASSETS, refund_plan

    assert set(VENDOR_STATUS_ASSETS) == set(STATUS_SYNC_ASSETS) == set(registry.names())
    for vendor, asset in VENDOR_STATUS_ASSETS.items():
        assert asset.key.path == [registry.step_name(vendor)]
        sync = STATUS_SYNC_ASSETS[vendor]
        assert sync.key.path == [registry.sync_step_name(vendor)]
        # A vendor's sync waits for its own vendor's answers only.
        assert {key.path[-1] for key in sync.asset_deps[sync.key]} == {"stuck_jobs", registry.step_name(vendor)}
    # No refund is planned before every vendor's jobs are synced.
    upstream = {key.path[-1] for key in refund_plan.asset_deps[refund_plan.key]}
    assert upstream == {registry.sync_step_name(v) for v in registry.names()}


def test_token_prefixes_are_each_vendors_own_and_redacted_in_any_text(monkeypatch) -> None:
    from reconcile.vendors import base

    assert registry.token_prefixes() == ("fal_", "kie_", "r8_")
    assert registry.get("replicate").token_prefixes == ("r8_",)
    assert base.redact("fal_0123456789 r8_0123456789 kie_0123456789") == "fal_*** r8_*** kie_***"
    # A vendor added from outside reconcile brings its own prefix, with nothing else edited.
    acme = Vendor(
        name="acme",
        url_var="ACME_URL",
        default_url="https://acme.invalid",
        secret_var="ACME_TOKEN",
        auth_scheme="Token",
        status_route=lambda job: ("/", ()),
        parse_status=registry.get("fal").parse_status,
        token_prefixes=("acme_live_",),
    )
    monkeypatch.setattr(registry, "_vendors", lambda: {"acme": acme})
    base._token_prefixes.cache_clear()
    try:
        assert base.redact("echo acme_live_0123456789") == "echo acme_live_***"
    finally:
        monkeypatch.undo()
        base._token_prefixes.cache_clear()
    with pytest.raises(ValueError, match="token prefix"):
        dataclasses.replace(acme, token_prefixes=("-x",))
