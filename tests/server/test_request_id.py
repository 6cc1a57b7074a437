"""X-Request-Id: echoed when sane, generated otherwise, on every response."""

from __future__ import annotations

import re

import pytest

from server.request_id import choose_request_id


async def test_given_id_is_echoed(http):
    response = await http.get("/v1/models", headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"


@pytest.mark.parametrize("path", ["/v1/models", "/health", "/v1/nope"])
async def test_missing_id_is_generated(http, path):
    response = await http.get(path)
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


async def test_id_on_errors_and_streams(http):
    response = await http.post("/v1/chat/completions", json={"messages": []}, headers={"X-Request-Id": "e1"})
    assert response.status_code == 400 and response.headers["x-request-id"] == "e1"
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    response = await http.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "s1"})
    assert response.headers["x-request-id"] == "s1"


async def test_unsafe_id_is_replaced(http):
    response = await http.get("/v1/models", headers={"X-Request-Id": "a b<script>"})
    assert response.headers["x-request-id"] != "a b<script>"


def test_choose_request_id():
    assert choose_request_id("ok.id:1") == "ok.id:1"
    assert len(choose_request_id("x" * 129)) == 32
    assert len(choose_request_id(None)) == 32
