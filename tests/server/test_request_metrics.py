"""Request-level metrics and the access log: vLLM's names and labels, fed by each request's
events; ``/metrics`` open without API keys and answered without the app; one access line
per API request, plain or JSON."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import httpx
import pytest

from engine.outputs import StreamDelta
from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams
from server.access_log import LOGGER_NAME, JsonLineFormatter
from server.config import ServerConfig
from server.generation import Job
from server.request_metrics import Histogram, RequestMetrics, RequestRecord
from server.serve import RunningServer
from tests.server.in_process import serving
from tests.server.pass_probe import keep_alive_passes
from tests.server.test_metrics import samples_of
from vl.prep_timings import PREP_SUMMARY_FIELDS, PrepTimings

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}
MODEL = {"model_name": "vlserve-tiny-qwen2-vl"}


def _delta(tokens: int, completion: int, finish: str | None = None) -> StreamDelta:
    return StreamDelta(
        text="x" * tokens,
        token_ids=[1] * tokens,
        logprobs=None,
        finish_reason=finish,
        prompt_tokens=7,
        completion_tokens=completion,
    )


def test_histogram_counts_cumulatively_with_weights():
    histogram = Histogram([0.1, 1.0])
    histogram.observe(0.05)
    histogram.observe(0.5, count=3)
    histogram.observe(5.0)
    assert histogram.buckets() == [(0.1, 1), (1.0, 4), (float("inf"), 5)]
    assert histogram.count == 5 and histogram.total == pytest.approx(0.05 + 1.5 + 5.0)


def test_record_counts_one_first_token_and_every_later_token_once():
    """A delta carrying k tokens (the engine coalesced them) counts k inter-token gaps;
    the first token is the time to first token, not a gap."""
    metrics = RequestMetrics()
    record = RequestRecord("POST", "/v1/chat/completions", metrics)
    job = Job(0, 0, EnginePrompt([1, 2, 3]), SamplingParams(max_tokens=6))
    record.prompt_ready([job])
    for delta in (_delta(1, 1), _delta(3, 4), _delta(2, 6, "length")):
        record.delta(job, delta)
    record.status, record.complete = 200, True
    record.finish()
    assert metrics.time_to_first_token.count == 1
    assert metrics.inter_token_latency.count == 5
    assert metrics.e2e_latency.count == metrics.prepare_time.count == 1
    assert metrics.generation_tokens.total == 6 and metrics.prompt_tokens.total == 7
    assert metrics.success == {"length": 1} and metrics.responses == {"2xx": 1}
    summary = record.summary()
    assert (summary["prompt_tokens"], summary["completion_tokens"], summary["images"]) == (7, 6, 0)
    assert summary["finish_reason"] == "length" and summary["ttft_ms"] is not None


def test_a_final_only_delta_counts_its_first_token_when_it_arrived():
    """A response that is not streamed gets one delta holding every token; the time to
    first token is when the first one reached the front end (``first_token_time``), not
    when the response was whole, and the other tokens count as gaps after it."""
    metrics = RequestMetrics()
    record = RequestRecord("POST", "/v1/chat/completions", metrics)
    job = Job(0, 0, EnginePrompt([1, 2, 3]), SamplingParams(max_tokens=4))
    record.prompt_ready([job])
    first = time.perf_counter()
    time.sleep(0.02)
    whole = StreamDelta("abcd", [1, 2, 3, 4], None, "length", 3, 4, first_token_time=first)
    record.delta(job, whole)
    record.status, record.complete = 200, True
    record.finish()
    assert record.first_token == first
    assert metrics.time_to_first_token.count == 1
    assert metrics.time_to_first_token.total == pytest.approx(first - record.arrived)
    assert metrics.inter_token_latency.count == 3
    assert metrics.inter_token_latency.total >= 0.02


def test_prep_timings_feed_the_stage_and_gate_wait_histograms_and_the_access_fields():
    """A chat's ``PrepTimings``: one observation per stage run and per wait, by name; the
    access-log fields carry the per-request sums in ms (``None`` for a request without)."""
    metrics = RequestMetrics()
    record = RequestRecord("POST", "/v1/chat/completions", metrics)
    timings = PrepTimings()
    for name, seconds in (("fetch", 0.2), ("fetch", 0.1), ("decode", 0.05), ("tokenize", 0.01)):
        timings.stage(name, seconds)
    timings.gate_wait("pixel_slots", 0.5)
    timings.gate_wait("tokenizer", None)  # not measured: ignored
    record.prep_measured(timings)
    assert metrics.prep_stages["fetch"].count == 2
    assert metrics.prep_stages["fetch"].total == pytest.approx(0.3)
    assert metrics.prep_stages["decode"].count == metrics.prep_stages["tokenize"].count == 1
    assert "preprocess" not in metrics.prep_stages
    assert metrics.gate_waits["pixel_slots"].count == 1 and "tokenizer" not in metrics.gate_waits
    summary = record.summary()
    assert summary["fetch_ms"] == 300.0 and summary["decode_ms"] == 50.0 and summary["preprocess_ms"] == 0.0
    assert summary["tokenize_ms"] == 10.0 and summary["gate_wait_ms"] == 500.0
    bare = RequestRecord("POST", "/v1/completions", metrics).summary()
    assert all(bare[field] is None for field in PREP_SUMMARY_FIELDS)


def test_cut_response_counts_no_success():
    metrics = RequestMetrics()
    record = RequestRecord("POST", "/v1/chat/completions", metrics)
    job = Job(0, 0, EnginePrompt([1]), SamplingParams(max_tokens=6))
    record.prompt_ready([job])
    record.delta(job, _delta(1, 1))
    record.status = 200  # the stream started, then the client left
    record.finish()
    assert metrics.success == {} and metrics.e2e_latency.count == 1


async def _scrape(server: RunningServer) -> dict:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    return samples_of(response.text)


@pytest.mark.parametrize("prefix", ["vlserve", "vllm"])
async def test_vllm_families_after_requests(vlserve_config, fake_factory, prefix):
    config = dataclasses.replace(vlserve_config, metrics_prefix=prefix, api_keys=("sekrit",))
    headers = {"Authorization": "Bearer sekrit"}
    async with serving(config, fake_factory, fast_http=True) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10, headers=headers) as http:
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
            assert "[DONE]" in (await http.post("/v1/chat/completions", json=STREAM)).text
            assert (await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})).status_code == 200
            assert (await http.post("/v1/chat/completions", json={"messages": []})).status_code == 400
        metrics = await _scrape(server)  # no key: /metrics is open, as the probes are
    other = "vllm" if prefix == "vlserve" else "vlserve"
    assert not any(name.startswith(f"{other}:") for name in metrics)
    labels = tuple(MODEL.items())
    ttft = metrics[f"{prefix}:time_to_first_token_seconds"]
    assert ttft[(f"{prefix}:time_to_first_token_seconds_count", labels)] == 3
    assert ttft[(f"{prefix}:time_to_first_token_seconds_bucket", (("le", "+Inf"), *labels))] == 3
    # fake deltas carry one token each: 4 + 4 + 2 tokens, less one first token per request
    itl = metrics[f"{prefix}:inter_token_latency_seconds"]
    assert itl[(f"{prefix}:inter_token_latency_seconds_count", labels)] == 7
    e2e = metrics[f"{prefix}:e2e_request_latency_seconds"]
    assert e2e[(f"{prefix}:e2e_request_latency_seconds_count", labels)] == 4  # the 400 too
    generated = metrics[f"{prefix}:request_generation_tokens"]
    assert generated[(f"{prefix}:request_generation_tokens_sum", labels)] == 10
    success = metrics[f"{prefix}:request_success"]
    assert success == {
        (f"{prefix}:request_success_total", (("finished_reason", "length"), *labels)): 1,
        (f"{prefix}:request_success_total", (("finished_reason", "stop"), *labels)): 2,
    }
    running = metrics[f"{prefix}:num_requests_running"]
    assert running == {(f"{prefix}:num_requests_running", labels): 0}
    responses = metrics["vlserve_responses"]
    assert responses[("vlserve_responses_total", (("code_class", "2xx"),))] == 3
    assert responses[("vlserve_responses_total", (("code_class", "4xx"),))] == 1
    prepare = metrics["vlserve_request_prepare_seconds"]
    assert prepare[("vlserve_request_prepare_seconds_count", ())] == 3


async def test_metrics_are_answered_in_the_pass_that_reads_them(vlserve_config, fake_factory):
    """Like a probe: no app task, no Quart (one scheduler pass on a keep-alive connection)."""
    async with serving(vlserve_config, fake_factory, fast_http=True) as server:
        assert await keep_alive_passes(server.url, "/metrics") <= 1


@pytest.mark.parametrize("fast_http", [True, False], ids=["http_path", "stock-hypercorn"])
async def test_metrics_without_api_key_on_both_paths(vlserve_config, fake_factory, fast_http):
    config = dataclasses.replace(vlserve_config, api_keys=("sekrit",))
    async with serving(config, fake_factory, fast_http=fast_http) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            assert (await http.get("/v1/models")).status_code == 401
            response = await http.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            assert "vlserve:e2e_request_latency_seconds" in response.text


def test_unknown_metrics_prefix_is_refused():
    with pytest.raises(ValueError, match="metrics_prefix"):
        ServerConfig(metrics_prefix="tgi")


async def test_one_access_line_per_api_request(vlserve_config, fake_factory, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    async with serving(vlserve_config, fake_factory, fast_http=True) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            headers = {"X-Request-Id": "req-42"}
            assert (await http.post("/v1/chat/completions", json=STREAM, headers=headers)).status_code == 200
            assert (await http.get("/health")).status_code == 200
            assert (await http.get("/metrics")).status_code == 200
            assert (await http.get("/v1/nothing")).status_code == 404
    lines = [r for r in caplog.records if r.name == LOGGER_NAME]
    assert [r.access["path"] for r in lines] == ["/v1/chat/completions", "/v1/nothing"]
    chat = lines[0].access
    assert chat["request_id"] == "req-42" and chat["status"] == 200 and chat["complete"] is True
    assert chat["completion_tokens"] == 4 and chat["images"] == 0 and chat["finish_reason"] == "stop"
    assert chat["ttft_ms"] <= chat["total_ms"]
    message = lines[0].getMessage()
    assert message.startswith("req-42 POST /v1/chat/completions 200 ") and "completion_tokens=4" in message
    assert lines[1].access["status"] == 404 and lines[1].access["prompt_tokens"] == 0
    as_json = json.loads(JsonLineFormatter().format(lines[0]))
    assert as_json["logger"] == LOGGER_NAME and as_json["request_id"] == "req-42"
    assert as_json["completion_tokens"] == 4


async def test_access_log_off(vlserve_config, fake_factory, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    config = dataclasses.replace(vlserve_config, access_log=False)
    async with serving(config, fake_factory, fast_http=True) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert not [r for r in caplog.records if r.name == LOGGER_NAME]


async def test_vlserve_serve_json_log_lines(tiny_model_dir):
    """``--log-format json``: the server's own lines and the access lines are JSON objects."""
    import signal

    import trio

    from tests.server.launch import launched, wait_ready

    args = ["-m", "server.cli", "serve", "--port", "0", "--log-format", "json"]
    async with launched(args, {"VLSERVE_MODEL": str(tiny_model_dir)}) as server:
        listening = json.loads((await server.wait_for_line(r"^\{.*listening on", 120)).string)
        url = listening["message"].rsplit(" ", 1)[1]
        await wait_ready(url, 120)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            response = await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
            assert response.status_code == 200
        access = json.loads((await server.wait_for_line(r'^\{.*"logger":"vlserve.access"', 10)).string)
        server.process.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            assert await server.process.wait() == 0, server.log()
    assert access["request_id"] == response.headers["X-Request-Id"]
    assert access["status"] == 200 and access["completion_tokens"] == 3 and access["total_ms"] > 0
    for line in server.lines:
        if line.startswith("{"):
            json.loads(line)
