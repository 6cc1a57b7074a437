"""One chat request as the load generator sends and records it. Non-streaming
(``complete_chat``) against an in-process fake server (``httpx.MockTransport``): what it
sends, how a good response becomes vLLM-style figures, and how bad ones are recorded,
never raised. Streaming (``stream_chat``) against a fake SSE server on loopback: pooled
connections are reused, or closed per request when the run asks for that."""

from __future__ import annotations

import json
import time
from functools import partial

import h11
import httpx
import pytest
import trio

from bench.loadgen.chat_request import CHAT_PATH, chat_body, complete_chat, stream_chat
from bench.loadgen.client_pool import ClientPool
from bench.loadgen.drivers import closed_loop
from bench.loadgen.metrics import summarise
from bench.loadgen.options import LoadOptions
from bench.loadgen.request_result import RequestResult
from bench.loadgen.run import LoadRun
from bench.report.results_files import run_record
from bench.serve import parse_args, plan_from_args, request_mode_line, results_stem

MESSAGES = [{"role": "user", "content": "hi"}]
COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "a b c d"}, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 17, "completion_tokens": 4, "total_tokens": 21},
}


async def _send(respond) -> tuple[RequestResult, list[httpx.Request]]:
    """Send one non-streaming request to a fake server whose answer is ``respond(request)``."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return respond(request)

    body = chat_body("m", MESSAGES, max_tokens=4, ignore_eos=True, stream=False)
    result = RequestResult(index=0, kind="text", started=time.perf_counter())
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://fake") as client:
        await complete_chat(client, body, result)
    return result, seen


def test_the_body_builder_streams_or_not():
    streaming = json.loads(chat_body("m", MESSAGES, max_tokens=4, ignore_eos=True))
    assert streaming["stream"] is True and streaming["stream_options"] == {"include_usage": True}
    plain = json.loads(chat_body("m", MESSAGES, max_tokens=4, ignore_eos=True, stream=False))
    assert plain["stream"] is False and "stream_options" not in plain
    assert {k: v for k, v in streaming.items() if k not in ("stream", "stream_options")} == {
        k: v for k, v in plain.items() if k != "stream"
    }


async def test_a_complete_response_is_one_chunk_with_the_servers_usage():
    result, [request] = await _send(lambda _: httpx.Response(200, json=COMPLETION))
    assert request.method == "POST" and request.url.path == CHAT_PATH
    assert request.headers["accept"] == "application/json"
    assert json.loads(request.content)["stream"] is False
    assert result.ok and result.error is None and result.status == 200
    assert (result.output_tokens, result.prompt_tokens) == (4, 17)
    assert result.chunk_times == [result.ended] and result.ended > result.started
    assert result.ttft == result.e2e  # TTFT is the whole latency
    assert result.tpot == 0.0  # vLLM's (e2e - ttft) / (tokens - 1)
    assert result.itls == []


@pytest.mark.parametrize(
    ("respond", "error"),
    [
        (lambda _: httpx.Response(503, text="busy"), "HTTP 503: busy"),
        (lambda _: httpx.Response(200, text="not json"), "JSONDecodeError"),
        (lambda _: httpx.Response(200, json={**COMPLETION, "usage": None}), "response without usage"),
        (lambda _: httpx.Response(200, json={**COMPLETION, "choices": []}), "response without a message"),
        (lambda _: httpx.Response(200, json={**COMPLETION, "choices": [{"index": 0}]}), "response without a message"),
        (lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused", request=r)), "ConnectError: refused"),
    ],
)
async def test_a_bad_response_is_recorded_not_raised(respond, error):
    result, _ = await _send(respond)
    assert not result.ok and result.error.startswith(error)
    assert result.chunk_times == [] and result.ttft is None and result.ended >= result.started


def test_a_non_streaming_run_reports_ttft_as_latency_and_tpot_itl_as_zero():
    """vLLM's convention: TTFT = E2E, TPOT = (E2E - TTFT) / (n - 1) = 0, ITL of no gaps = 0."""
    run = LoadRun(options=LoadOptions(concurrency=2, stream=False), server="s", workload="text")
    run.burst_started, run.burst_ended = 0.0, 2.0
    run.results = [
        RequestResult(index=i, kind="text", started=0.0, ended=e, ok=True, chunk_times=[e], output_tokens=4)
        for i, e in ((0, 0.5), (1, 1.5))
    ]
    s = summarise(run)
    assert s.mode == "closed-loop, non-streaming"
    assert s.mean_ttft_ms == pytest.approx(1000.0) and s.mean_e2el_ms == pytest.approx(1000.0)
    assert (s.mean_tpot_ms, s.p99_tpot_ms, s.mean_itl_ms, s.p99_itl_ms) == (0.0, 0.0, 0.0, 0.0)
    assert s.output_throughput == pytest.approx(4.0)
    assert " · closed-loop, non-streaming · " in s.vllm_report()
    assert run_record(run, s)["options"]["stream"] is False


def test_no_stream_flag_reaches_the_options_the_files_and_the_mode_line(tmp_path):
    plan = plan_from_args(parse_args(["--no-stream", "--workload", "text", "--concurrency", "4"]))
    assert plan.options.stream is False
    assert results_stem(tmp_path, plan, "T").name == "T-text-c4-nostream"
    assert "non-streaming" in request_mode_line(plan.options)
    default = plan_from_args(parse_args(["--workload", "text", "--concurrency", "4"]))
    assert default.options.stream is True and default.options.mode == "closed-loop"
    assert results_stem(tmp_path, default, "T").name == "T-text-c4"
    real = plan_from_args(parse_args(["--no-stream", "--workload", "image-url", "--image-tokens", "real"]))
    assert results_stem(tmp_path, real, "T").name == "T-image-url-c64-real-size-nostream"


SSE_EVENTS = (
    b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n',
    b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n\n',
    b"data: [DONE]\n\n",
)


async def _serve_sse(stream: trio.SocketStream, accepted: list[list[bytes]]) -> None:
    """One connection of a fake chat server: each request gets ``SSE_EVENTS`` as a chunked
    body (each event its own write); the ``connection`` header of every request is kept in
    this connection's entry of ``accepted``."""
    connection = h11.Connection(h11.SERVER)
    headers_seen: list[bytes] = []
    accepted.append(headers_seen)
    async with stream:
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                connection.receive_data(data)
            elif isinstance(event, h11.Request):
                headers_seen.append(dict(event.headers).get(b"connection", b""))
            elif isinstance(event, h11.EndOfMessage):
                head = h11.Response(status_code=200, headers=[("content-type", "text/event-stream")])
                await stream.send_all(connection.send(head))
                for sse in SSE_EVENTS:
                    await stream.send_all(connection.send(h11.Data(data=sse)))
                await stream.send_all(connection.send(h11.EndOfMessage()))
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return


@pytest.mark.parametrize("close_connection", [False, True], ids=["reused", "per-request"])
async def test_streaming_requests_reuse_their_connection_unless_asked_not_to(close_connection):
    """Three streaming requests in a row: read to the end of the body after ``[DONE]``, they
    share one pooled connection (as vLLM's benchmark and the async openai client do); with
    ``close_connection`` each asks ``Connection: close`` and the server accepts three."""
    accepted: list[list[bytes]] = []
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, lambda s: _serve_sse(s, accepted), 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for index in range(3):
                result = RequestResult(index=index, kind="text", started=time.perf_counter())
                body = chat_body("m", MESSAGES, max_tokens=1, ignore_eos=True)
                await stream_chat(client, body, result, close_connection=close_connection)
                assert result.ok and result.output_tokens == 1 and result.prompt_tokens == 3
        nursery.cancel_scope.cancel()
    if close_connection:
        assert accepted == [[b"close"]] * 3
    else:
        assert len(accepted) == 1 and len(accepted[0]) == 3 and b"close" not in accepted[0]


def test_connection_per_request_flag_reaches_the_options_the_files_and_the_mode_line(tmp_path):
    plan = plan_from_args(parse_args(["--connection-per-request", "--results-dir", str(tmp_path)]))
    assert plan.options.connection_per_request
    assert results_stem(tmp_path, plan, "T").name.endswith("-newconn")
    assert "new connection per request" in request_mode_line(plan.options)
    default = plan_from_args(parse_args(["--results-dir", str(tmp_path)]))
    assert not default.options.connection_per_request
    assert "keep-alive connections, one per concurrent request" in request_mode_line(default.options)


async def test_the_client_pool_gives_each_request_in_flight_a_connection_of_its_own():
    """Nine streaming requests, three at a time, through a pool of three clients: no two
    requests in flight share a client, every client keeps its one connection alive, so
    the server accepts exactly three connections and each carries three requests."""
    accepted: list[list[bytes]] = []
    in_use: set[int] = set()
    most_in_use = 0
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, lambda s: _serve_sse(s, accepted), 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        timeout = httpx.Timeout(10.0)
        async with ClientPool.open(f"http://127.0.0.1:{port}", 3, timeout) as pool:

            async def send(index: int) -> None:
                nonlocal most_in_use
                async with pool.client() as client:
                    assert id(client) not in in_use
                    in_use.add(id(client))
                    most_in_use = max(most_in_use, len(in_use))
                    result = RequestResult(index=index, kind="text", started=time.perf_counter())
                    body = chat_body("m", MESSAGES, max_tokens=1, ignore_eos=True)
                    await stream_chat(client, body, result)
                    in_use.discard(id(client))
                    assert result.ok

            await closed_loop(send, range(9), 3)
        nursery.cancel_scope.cancel()
    assert most_in_use == 3
    assert sorted(len(requests) for requests in accepted) == [3, 3, 3]


async def test_a_request_cancelled_while_holding_a_client_gives_it_back():
    """The pool's invariant under cancellation: a client lent to a request that is
    cancelled returns to the pool, and one waiting for a client takes nothing."""
    async with ClientPool.open("http://127.0.0.1:9", 1, httpx.Timeout(1.0)) as pool:
        with trio.move_on_after(0.05):
            async with pool.client():
                with trio.move_on_after(0.01) as waiting:
                    async with pool.client():
                        pytest.fail("the pool lent its only client twice")
                assert waiting.cancelled_caught
                await trio.sleep_forever()
        with trio.fail_after(1):
            async with pool.client() as client:
                assert isinstance(client, httpx.AsyncClient)
