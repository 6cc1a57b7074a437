"""Extreme but well-formed values on the real tiny model: each is a 4xx or a normal
answer, never a 5xx, and the model keeps serving (the fake runtime of
``test_any_body.py`` has no sampler, tokenizer or grammar compiler of its own)."""

from __future__ import annotations

import httpx
import pytest

from tests.server.real_runtime import model_name, vlserve_config, vlserve_runtime_factory  # noqa: F401
from tests.server.test_any_body import assert_not_failed, nested_schema

USER = [{"role": "user", "content": "hi"}]

EXTREMES = {
    "seed-u64-max": {"seed": 2**64 - 1},
    "seed-u64-max-n2": {"seed": 2**64 - 1, "n": 2},
    "seed-min": {"seed": -(2**63)},
    "top-k-huge": {"top_k": 2**62},
    "top-k-negative": {"top_k": -(2**62)},
    "repetition-penalty-huge": {"repetition_penalty": 1e18, "presence_penalty": 2, "frequency_penalty": -2},
    "repetition-penalty-tiny": {"repetition_penalty": 1e-300},
    "min-p-one": {"min_p": 1.0, "temperature": 2},
    "temperature-tiny": {"temperature": 1e-300},
    "stop-token-ids-huge": {"stop_token_ids": [2**64 - 1, 0]},
    "logit-bias-out-of-vocabulary": {"logit_bias": {"99999999999999999999": 100, "0": -100}},
    "min-tokens-huge": {"min_tokens": 2**62, "max_tokens": 2},
    "deep-schema": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": nested_schema(30)}}
    },
    "enum-of-nothing": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "e", "schema": {"enum": []}}}
    },
}


@pytest.fixture
async def http(vlserve_base_url):
    async with httpx.AsyncClient(base_url=vlserve_base_url, timeout=60.0) as client:
        yield client


async def test_extreme_values_never_fail(http, model_name):
    for name, fields in EXTREMES.items():
        body = {"model": model_name, "messages": USER, "max_tokens": 3, **fields}
        response = await http.post("/v1/chat/completions", json=body)
        assert response.status_code < 500, (name, response.text)
        assert_not_failed(response)
    for body in ({"prompt": [2**63]}, {"prompt": [[0, 1], [2**64 - 1]]}, {"prompt": "x", "seed": 2**64 - 1, "n": 3}):
        assert_not_failed(await http.post("/v1/completions", json={"model": model_name, "max_tokens": 2, **body}))
    assert_not_failed(await http.post("/detokenize", json={"tokens": [2**64 - 1, -(2**63), 0, 5]}))
    assert_not_failed(await http.post("/tokenize", json={"prompt": "\U0010ffff\u200b" * 50}))
    response = await http.post("/v1/chat/completions", json={"model": model_name, "messages": USER, "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert (await http.get("/health")).status_code == 200
