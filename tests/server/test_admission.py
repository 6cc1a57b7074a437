"""Bounded admission: beyond the limit, 503 + Retry-After before any preparation."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
import trio

from tests.server.fakes import FakeRuntime, Script

LIMIT = 2
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def vlserve_config(vlserve_config):
    return dataclasses.replace(vlserve_config, max_concurrent_requests=LIMIT)


async def _wait_for(predicate, timeout=5.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


async def test_over_the_limit_is_503_before_preparation(http, fake_runtime: FakeRuntime, vlserve_server):
    preparer = fake_runtime.preparer
    preparer.gate = trio.Event()
    results = []

    async def call():
        results.append(await http.post("/v1/chat/completions", json=CHAT))

    async with trio.open_nursery() as nursery:
        for _ in range(LIMIT):
            nursery.start_soon(call)
        await _wait_for(lambda: preparer.entered == LIMIT)
        refused = await http.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
        assert preparer.entered == LIMIT  # the refused request never reached preparation
        for path in ("/health", "/ready"):  # probes never wait on or count against the limit
            assert (await http.get(path)).status_code == 200
        stats = vlserve_server.state.admission.statistics()
        assert (stats.in_flight, stats.refused) == (LIMIT, 1)
        preparer.gate.set()
    assert [r.status_code for r in results] == [200] * LIMIT
    # the slot is released when the ASGI call returns, just after the last byte is sent
    await _wait_for(lambda: vlserve_server.state.admission.statistics().in_flight == 0)


async def test_slot_is_held_for_the_whole_stream_and_released_on_disconnect(
    http, vlserve_base_url, fake_runtime, vlserve_server
):
    fake_runtime.engine.script = Script(pieces=["t"] * 100, delay=0.02)
    admission = vlserve_server.state.admission
    body = {**CHAT, "stream": True, "max_tokens": 100}
    async with httpx.AsyncClient(base_url=vlserve_base_url, timeout=10) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for _ in response.aiter_lines():
                break
            assert admission.statistics().in_flight == 1
    await _wait_for(lambda: admission.statistics().in_flight == 0)
    await _wait_for(lambda: fake_runtime.engine.running == 0)
    assert fake_runtime.engine.aborted == 1


async def test_openai_client_sees_503_as_internal_server_error(vlserve_client, fake_runtime):
    import openai

    fake_runtime.preparer.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(LIMIT):
            nursery.start_soon(
                lambda: vlserve_client.chat.completions.create(model="fake-model", messages=CHAT["messages"])
            )
        await _wait_for(lambda: fake_runtime.preparer.entered == LIMIT)
        with pytest.raises(openai.InternalServerError) as raised:
            await vlserve_client.chat.completions.create(model="fake-model", messages=CHAT["messages"])
        assert raised.value.status_code == 503
        fake_runtime.preparer.gate.set()
