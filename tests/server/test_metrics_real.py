"""``/metrics`` over the real runtime (tiny model): engine and gate figures are read."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.runtime import open_runtime


@pytest.fixture
def vlserve_config(vlserve_config, tiny_model_dir):
    return dataclasses.replace(vlserve_config, model=str(tiny_model_dir))


@pytest.fixture
def vlserve_runtime_factory(tiny_model):
    return lambda config: open_runtime(config, loaded=tiny_model)


async def test_real_runtime_metrics(http, vlserve_server):
    await vlserve_server.wait_ready()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
    response = await http.get("/metrics")
    assert response.status_code == 200
    samples = {
        (s.name, s.labels.get("gate")): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert samples[("vlserve_engine_generation_tokens_total", None)] >= 4
    assert samples[("vlserve_engine_steps_total", None)] >= 1
    assert ("vlserve_engine_running", None) in samples
    for gate in ("image_prep", "tokenizer", "device"):
        assert ("vlserve_gate_tokens", gate) in samples
        assert samples[("vlserve_gate_borrowed", gate)] == 0
