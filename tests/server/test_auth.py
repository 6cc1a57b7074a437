"""Bearer API keys: 401 without or with a wrong key; probes are exempt."""

from __future__ import annotations

import dataclasses

import openai
import pytest

from server.auth import ApiKeys, bearer_token

KEYS = ("key-one", "key-two")


@pytest.fixture
def vlserve_config(vlserve_config):
    return dataclasses.replace(vlserve_config, api_keys=KEYS)


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer nope"}, "invalid_api_key"),
        ({"Authorization": "Bearer key-one-and-more"}, "invalid_api_key"),
        ({"Authorization": "Basic a2V5LW9uZQ=="}, "missing_api_key"),
        ({"Authorization": "Bearer"}, "missing_api_key"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/models", "/v1/nope"])
async def test_bad_or_missing_key_is_401(http, headers, code, path):
    response = await http.get(path, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == code
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("key", KEYS)
async def test_each_configured_key_works(http, key):
    response = await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200


@pytest.mark.parametrize("path", ["/health", "/ready"])
async def test_probes_need_no_key(http, path):
    assert (await http.get(path)).status_code == 200


async def test_openai_client_raises_authentication_error(vlserve_base_url):
    async with openai.AsyncOpenAI(base_url=f"{vlserve_base_url}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()


async def test_plugin_client_uses_the_first_key(vlserve_client):
    assert (await vlserve_client.models.list()).data[0].id == "fake-model"


def test_bearer_token_parsing():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Token abc") is None
    assert bearer_token(None) is None


def test_no_keys_means_auth_disabled():
    assert not ApiKeys([]).enabled
    assert ApiKeys(["a"]).accepts("a") and not ApiKeys(["a"]).accepts("b")
