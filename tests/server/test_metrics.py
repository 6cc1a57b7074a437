"""``GET /metrics``: Prometheus text with the loop-lag, request, engine and gate figures,
answered even when admission refuses everything else."""

from __future__ import annotations

import dataclasses

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.server.fakes import FakeRuntime

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def vlserve_config(vlserve_config):
    return dataclasses.replace(vlserve_config, max_concurrent_requests=1)


def samples_of(text: str) -> dict[str, dict[tuple, float]]:
    """Metric family name -> {(sample name, sorted labels): value}."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    return out


async def scrape(http) -> dict[str, dict[tuple, float]]:
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples_of(response.text)


async def test_metrics_names_and_values(http, vlserve_server, fake_runtime: FakeRuntime):
    await vlserve_server.wait_ready()
    assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
    metrics = await scrape(http)
    lag = metrics["vlserve_event_loop_lag_seconds"]
    assert ("vlserve_event_loop_lag_seconds_bucket", (("le", "+Inf"),)) in lag
    assert ("vlserve_event_loop_lag_seconds_count", ()) in lag
    recent = metrics["vlserve_event_loop_lag_recent_seconds"]
    assert {labels for _, labels in recent} == {(("quantile", q),) for q in ("0.5", "0.99", "1")}
    assert metrics["vlserve_requests_in_flight"] == {("vlserve_requests_in_flight", ()): 0}
    assert metrics["vlserve_requests_limit"] == {("vlserve_requests_limit", ()): 1}
    assert metrics["vlserve_runtime_ready"] == {("vlserve_runtime_ready", ()): 1}
    steps = metrics["vlserve_engine_steps"][("vlserve_engine_steps_total", ())]
    assert steps == fake_runtime.engine.steps > 0
    assert ("vlserve_engine_running", ()) in metrics["vlserve_engine_running"]
    assert "process_cpu_seconds" in metrics


async def test_metrics_answer_while_admission_refuses(http, vlserve_server, fake_runtime):
    """/metrics takes no admission slot: with the only slot held by a request stuck in
    preparation, other requests get 503 and /metrics still answers, counting both."""
    await vlserve_server.wait_ready()
    preparer = fake_runtime.preparer
    preparer.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: http.post("/v1/chat/completions", json=CHAT))
        with trio.fail_after(5):
            while preparer.entered < 1:
                await trio.sleep(0.005)
        assert (await http.get("/v1/models")).status_code == 503
        metrics = await scrape(http)
        assert metrics["vlserve_requests_in_flight"] == {("vlserve_requests_in_flight", ()): 1}
        refused = metrics["vlserve_requests_refused"][("vlserve_requests_refused_total", ())]
        assert refused >= 1
        preparer.gate.set()
