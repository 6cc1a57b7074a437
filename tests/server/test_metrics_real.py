"""``/metrics`` over the real runtime (tiny model): engine and gate figures are read."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.server.real_runtime import vlserve_config, vlserve_runtime_factory  # noqa: F401


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


def _png_uri() -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 90)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def test_real_runtime_vllm_families(http, vlserve_server):
    """The same image twice: two images prepared, one feature-cache hit of two lookups;
    the engine's figures under vLLM's names. Each preparation stage counted once per image
    (tokenize once per request), encode once (one forward; the repeat is a cache hit),
    each gate's wait once per request, queue time once per sequence (the runtime's
    warm-up sequence too), the encoder's one
    batch of one image."""
    await vlserve_server.wait_ready()
    content = [{"type": "image_url", "image_url": {"url": _png_uri()}}, {"type": "text", "text": "what?"}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 3, "ignore_eos": True}
    for _ in range(2):
        response = await http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
    response = await http.get("/metrics")
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
        if s.labels.get("model_name") in (None, vlserve_server.state.config.model_name)
    }
    assert samples["vlserve:mm_cache_queries_total"] == 2
    # each chat joined a step alone: its image was encoded in that step, none ahead of it
    assert samples["vlserve_engine_images_encoded_total"] == 1
    assert samples["vlserve_engine_images_encoded_ahead_total"] == 0
    assert samples["vlserve:mm_cache_hits_total"] == 1
    assert samples["vlserve_images_total"] == 2
    assert samples["vlserve:generation_tokens_total"] >= 6
    assert samples["vlserve:num_requests_running"] >= 0 and samples["vlserve:num_requests_waiting"] >= 0
    assert 0 <= samples["vlserve:kv_cache_usage_perc"] <= 1
    # the second chat repeats the first's prompt and image: its full blocks come from the prefix cache
    assert samples["vlserve:prefix_cache_queries_total"] > samples["vlserve:prefix_cache_hits_total"] > 0
    assert samples["vlserve:num_preemptions_total"] == 0
    assert samples["vlserve:time_to_first_token_seconds_count"] == 2
    assert samples["vlserve:request_queue_time_seconds_count"] == 3  # the two requests and the warm-up
    assert samples["vlserve_engine_step_seconds_count"] >= 2
    assert samples["vlserve_encoder_batch_size_count"] == 1 and samples["vlserve_encoder_batch_size_sum"] == 1
    by_label = {
        (s.name, s.labels.get("stage") or s.labels.get("gate")): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    for stage in ("fetch", "decode", "preprocess", "tokenize"):
        assert by_label[("vlserve_prep_stage_seconds_count", stage)] == 2, stage
    assert by_label[("vlserve_prep_stage_seconds_count", "encode")] == 1
    for gate in ("tokenizer", "image_prep", "pixel_slots"):
        assert by_label[("vlserve_gate_wait_seconds_count", gate)] == 2, gate
    for gate in ("fetch", "pixel_slots"):
        assert by_label[("vlserve_gate_borrowed", gate)] == 0 and by_label[("vlserve_gate_tokens", gate)] >= 1
    assert by_label[("vlserve_gate_completed_total", "pixel_slots")] == 2


async def test_a_response_that_is_not_streamed_still_times_its_first_token(http, vlserve_server):
    """A non-streamed chat reaches the front end as one delta (a final-only stream), yet
    its time to first token is when the first token arrived: shorter than the whole
    request, with the 15 other tokens counted as inter-token gaps."""
    await vlserve_server.wait_ready()

    async def figures() -> dict[str, float]:
        text = (await http.get("/metrics")).text
        return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}

    before = await figures()
    body = {"messages": [{"role": "user", "content": "count to twenty"}], "max_tokens": 16, "ignore_eos": True}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 16
    after = await figures()

    def grew(name: str) -> float:
        return after[f"vlserve:{name}"] - before.get(f"vlserve:{name}", 0.0)

    assert grew("time_to_first_token_seconds_count") == 1
    assert grew("inter_token_latency_seconds_count") == 15
    assert 0 < grew("time_to_first_token_seconds_sum") < grew("e2e_request_latency_seconds_sum")
