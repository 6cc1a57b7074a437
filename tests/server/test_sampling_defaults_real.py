"""``generation_config.json`` defaults on the real tiny model, through the official client:
a copy of the model that ships ``max_new_tokens`` and greedy ``top_k`` serves requests
that leave those fields unset with them."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from engine.model_loader import load_model
from server.runtime import open_runtime

USER = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def shipping_model(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model whose generation_config.json sets sampling defaults."""
    copy = tmp_path_factory.mktemp("shipping") / "tiny"
    shutil.copytree(tiny_model_dir, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    config.update(max_new_tokens=3, top_k=1, temperature=1.0)
    (copy / "generation_config.json").write_text(json.dumps(config))
    return load_model(copy)


@pytest.fixture
def vlserve_config(vlserve_config, shipping_model):
    return dataclasses.replace(vlserve_config, model=str(shipping_model.path))


@pytest.fixture
def vlserve_runtime_factory(shipping_model):
    return lambda config: open_runtime(config, loaded=shipping_model)


async def test_the_models_defaults_apply_to_unset_fields(vlserve_client, vlserve_config):
    name = vlserve_config.model_name
    first = await vlserve_client.chat.completions.create(model=name, messages=USER, extra_body={"ignore_eos": True})
    again = await vlserve_client.chat.completions.create(model=name, messages=USER, extra_body={"ignore_eos": True})
    assert first.usage.completion_tokens == 3 and first.choices[0].finish_reason == "length"
    assert first.choices[0].message.content == again.choices[0].message.content  # top_k=1: greedy
    longer = await vlserve_client.chat.completions.create(
        model=name, messages=USER, max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert longer.usage.completion_tokens == 5
    assert longer.choices[0].message.content.startswith(first.choices[0].message.content)
