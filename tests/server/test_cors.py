"""CORS for configured origins: preflights answered before auth; headers on every response."""

from __future__ import annotations

import dataclasses

import pytest

ORIGIN = "https://app.example"


@pytest.fixture
def vlserve_config(vlserve_config):
    return dataclasses.replace(vlserve_config, cors_allow_origins=(ORIGIN,), api_keys=("k",))


async def test_preflight_needs_no_key(http):
    response = await http.options(
        "/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.status_code == 204
    assert "POST" in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-allow-headers"] == "authorization, content-type"
    assert response.headers["access-control-allow-origin"] == ORIGIN


async def test_allowed_origin_gets_headers_even_on_errors(http):
    response = await http.get("/v1/models", headers={"Origin": ORIGIN})
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "Origin" in response.headers["vary"]


async def test_other_origin_gets_no_cors_headers(http):
    response = await http.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers
