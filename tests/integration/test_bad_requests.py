"""Requests the engine cannot take are refused up front; the server keeps serving."""

from __future__ import annotations

import pytest

from tests.integration.invariants import wait_until_quiescent


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"seed": 2**64}, "seed"),
        ({"temperature": -1}, "temperature"),
        ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({"max_tokens": 10**6}, "max_tokens"),
    ],
)
async def test_bad_sampling_request_is_400_and_server_keeps_serving(http, runtime, extra, param):
    body = {"model": runtime.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    response = await http.post("/v1/chat/completions", json={**body, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    ok = await http.post("/v1/chat/completions", json=body)
    assert ok.status_code == 200
    assert (await http.get("/health")).status_code == 200
    await wait_until_quiescent(runtime)
