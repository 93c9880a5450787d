"""The vendors' real behaviour through the fetch engine, over loopback HTTP against the simulator:
fal app failures and namespaced apps, each KIE product, Replicate's removed outputs, and the outage
forms that must change nothing (contract, "Vendor status APIs"; the answers' shapes are pinned by
tests/fixtures/vendors and test_vendor_conformance.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from reconcile.models import JobRef, VendorHealth, VendorState
from reconcile.settings import Settings, load_settings
from reconcile.simulator import Outcome, SimulatorThread, TaskTruth
from reconcile.vendors import Tuning, fetch_vendor_truth
from reconcile.vendors import kie as kie_vendor

FAST = Tuning(backoff_base_seconds=0.01, backoff_max_seconds=0.02, min_sample=10)
_ids = itertools.count()


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorThread]:
    with SimulatorThread([]) as sim:
        yield sim


@pytest.fixture
def sim(simulator: SimulatorThread) -> SimulatorThread:
    simulator.reset_knobs()
    simulator.reset_stats()
    return simulator


def settings(sim: SimulatorThread, **env: Any) -> Settings:
    values = {
        **sim.env(),
        "RECONCILE_VENDOR_TIMEOUT_SECONDS": "2",
        "RECONCILE_VENDOR_MAX_ATTEMPTS": "3",
        "RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND": "5000",
    }
    values.update({k: str(v) for k, v in env.items()})
    return load_settings(values)


def add(sim: SimulatorThread, vendor: str, model: str, outcome: Outcome, **kw: Any) -> JobRef:
    truth = TaskTruth(vendor, f"{vendor}-{next(_ids)}", model, outcome, **kw)
    sim.put_task(truth)
    return JobRef(f"job-{next(_ids)}", vendor, model, truth.vendor_task_id)


def ask(sim: SimulatorThread, jobs: list[JobRef], **env: Any):
    result = fetch_vendor_truth(jobs, settings(sim, **env), "run-truth", tuning=FAST)
    return result, {a.job_id: a for a in result.answers}


# --- fal ----------------------------------------------------------------------------------------


def test_fal_app_failures_are_failures_with_the_details_messages(sim: SimulatorThread) -> None:
    rejected = add(sim, "fal", "fal-ai/flux/dev", Outcome.FAILED, result_http_status=422, error="flagged by a checker")
    crashed = add(sim, "fal", "fal-ai/flux/dev", Outcome.FAILED, result_http_status=500, error="CUDA OOM")
    fine = [
        add(sim, "fal", "fal-ai/flux/dev", Outcome.COMPLETED, result_url=f"https://cdn.test/{n}.png") for n in range(3)
    ]
    result, answers = ask(sim, [rejected, crashed, *fine])
    assert result.health["fal"] is VendorHealth.OK, result.health_detail
    assert answers[rejected.job_id].state is VendorState.FAILED
    assert "flagged by a checker" in answers[rejected.job_id].error
    assert answers[crashed.job_id].state is VendorState.FAILED
    assert "CUDA OOM" in answers[crashed.job_id].error
    assert answers[crashed.job_id].attempts == 4  # status + 3 result attempts: a 5xx counts once it persists
    assert answers[rejected.job_id].attempts == 2  # status + one result request: a 422 is final at once
    assert all(answers[j.job_id].state is VendorState.COMPLETED for j in fine)


def test_fal_result_endpoint_failing_for_most_requests_is_an_outage(sim: SimulatorThread) -> None:
    crashed = [add(sim, "fal", "fal-ai/flux/dev", Outcome.FAILED, result_http_status=500) for _ in range(4)]
    fine = add(sim, "fal", "fal-ai/flux/dev", Outcome.COMPLETED, result_url="https://cdn.test/ok.png")
    result, _ = ask(sim, [*crashed, fine])
    assert result.health["fal"] is VendorHealth.DOWN
    assert "result" in result.health_detail["fal"] and "4 of 5" in result.health_detail["fal"]


def test_a_lone_fal_app_failure_answered_5xx_is_the_apps_failure_not_an_outage(sim: SimulatorThread) -> None:
    """The only completed fal job of a pass (1 of 1 result requests failing) is no outage of fal."""
    crashed = add(sim, "fal", "fal-ai/flux/dev", Outcome.FAILED, result_http_status=500, error="CUDA OOM")
    running = add(sim, "fal", "fal-ai/flux/dev", Outcome.RUNNING)
    result, answers = ask(sim, [crashed, running])
    assert result.health["fal"] is VendorHealth.OK, result.health_detail
    assert answers[crashed.job_id].state is VendorState.FAILED and "CUDA OOM" in answers[crashed.job_id].error


def test_two_fal_app_failures_answered_5xx_out_of_two_are_an_outage(sim: SimulatorThread) -> None:
    crashed = [add(sim, "fal", "fal-ai/flux/dev", Outcome.FAILED, result_http_status=500) for _ in range(2)]
    result, _ = ask(sim, crashed)
    assert result.health["fal"] is VendorHealth.DOWN and "2 of 2" in result.health_detail["fal"]


def test_fal_namespaced_apps_keep_three_segments(sim: SimulatorThread) -> None:
    workflow = add(sim, "fal", "workflows/acme/upscale-video", Outcome.COMPLETED, result_url="https://cdn.test/w.mp4",
                   media="video")  # fmt: skip
    comfy = add(sim, "fal", "comfy/acme/portrait", Outcome.FAILED, result_http_status=422, error="bad input")
    subpath = add(sim, "fal", "fal-ai/kling-video/v2/master/text-to-video", Outcome.RUNNING)
    _, answers = ask(sim, [workflow, comfy, subpath])
    assert answers[workflow.job_id].result_url == "https://cdn.test/w.mp4"
    assert answers[comfy.job_id].state is VendorState.FAILED
    assert answers[subpath.job_id].state is VendorState.RUNNING
    assert sim.stats()["fal"]["not_found"] == 0


# --- KIE products -------------------------------------------------------------------------------

PRODUCT_MODELS = {
    "market": "google/nano-banana",
    "veo": "veo3_fast",
    "runway": "runway-gen4-turbo",
    "gpt4o_image": "gpt4o-image",
    "flux_kontext": "flux-kontext-pro",
    "midjourney": "mj_txt2img",
    "suno": "suno/V4_5",
    "luma": "luma-modify",
}


def test_every_kie_product_is_in_the_table_and_routed_by_model() -> None:
    assert {p.name for p in kie_vendor.PRODUCTS} == set(PRODUCT_MODELS)
    for name, model in PRODUCT_MODELS.items():
        assert kie_vendor.product_for(model).name == name
    assert kie_vendor.product_for("kling/v2-1-pro").name == "market"  # anything else is the Market


@pytest.mark.parametrize("product", sorted(PRODUCT_MODELS))
def test_each_kie_product_reads_its_own_record(sim: SimulatorThread, product: str) -> None:
    model = PRODUCT_MODELS[product]
    done = add(sim, "kie", model, Outcome.COMPLETED, result_url=f"https://cdn.test/{product}.bin")
    failed = add(sim, "kie", model, Outcome.FAILED, error=f"{product} broke")
    running = add(sim, "kie", model, Outcome.RUNNING)
    result, answers = ask(sim, [done, failed, running])
    assert result.health["kie"] is VendorHealth.OK, result.health_detail
    assert (answers[done.job_id].state, answers[done.job_id].result_url) == (
        VendorState.COMPLETED,
        f"https://cdn.test/{product}.bin",
    )
    assert answers[failed.job_id].state is VendorState.FAILED and f"{product} broke" in answers[failed.job_id].error
    assert answers[running.job_id].state in (VendorState.RUNNING, VendorState.QUEUED)


def test_kie_traps_luma_flag_4_is_a_success_and_suno_partial_successes_are_not_final(sim: SimulatorThread) -> None:
    luma = add(sim, "kie", "luma-modify", Outcome.COMPLETED, result_url="https://cdn.test/l.mp4", status_word="4")
    text_only = add(sim, "kie", "suno/V4_5", Outcome.RUNNING, status_word="TEXT_SUCCESS")
    first_track = add(sim, "kie", "suno/V4_5", Outcome.RUNNING, status_word="FIRST_SUCCESS",
                      result_url="https://cdn.test/first.mp3")  # fmt: skip
    _, answers = ask(sim, [luma, text_only, first_track])
    assert (answers[luma.job_id].state, answers[luma.job_id].result_url) == (
        VendorState.COMPLETED,
        "https://cdn.test/l.mp4",
    )
    assert answers[text_only.job_id].state is VendorState.RUNNING
    assert answers[first_track.job_id].state is VendorState.RUNNING


def test_kie_maintenance_455_is_retried_and_never_a_failure(sim: SimulatorThread) -> None:
    job = add(sim, "kie", "veo3", Outcome.FAILED, error="would be refunded")
    sim.set_knobs("kie", error_share=1.0, error_statuses=(455,))
    _result, answers = ask(sim, [job])
    answer = answers[job.job_id]
    assert answer.state is VendorState.UNKNOWN and answer.reason == "kie_code_455"
    assert answer.attempts == 3


def test_a_kie_product_answering_not_found_for_everything_is_misconfigured(sim: SimulatorThread) -> None:
    known = [add(sim, "kie", "google/nano-banana", Outcome.FAILED) for _ in range(30)]
    unknown_veo = [JobRef(f"job-{next(_ids)}", "kie", "veo3_fast", f"never-{next(_ids)}") for _ in range(12)]
    result, _ = ask(sim, [*known, *unknown_veo])
    assert result.health["kie"] is VendorHealth.MISCONFIGURED, result.health_detail
    assert "veo" in result.health_detail["kie"] and "/api/v1/veo/record-info" in result.health_detail["kie"]


# --- Replicate ----------------------------------------------------------------------------------


def test_replicate_removed_output_is_completed_without_a_url(sim: SimulatorThread) -> None:
    job = add(sim, "replicate", "stability-ai/sdxl", Outcome.COMPLETED, output_removed=True)
    _, answers = ask(sim, [job])
    answer = answers[job.job_id]
    assert (answer.state, answer.result_url, answer.reason) == (VendorState.COMPLETED, None, "output_removed")
