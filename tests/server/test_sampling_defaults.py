"""A model's ``generation_config.json`` sampling defaults fill the fields a request
leaves unset (vLLM's ``--generation-config auto``); ``vllm`` turns them off."""

from __future__ import annotations

import json

import pytest

from server.sampling import sampling_params
from server.sampling_defaults import SamplingDefaults, read_sampling_defaults
from server.schemas.chat import ChatCompletionRequest

USER = [{"role": "user", "content": "hi"}]
SHIPPED = {
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
    "max_new_tokens": 9,
    "eos_token_id": [1, 2],
}


def write_config(directory, config) -> None:
    (directory / "generation_config.json").write_text(json.dumps(config))


def test_auto_reads_the_sampling_keys_of_the_models_file(tmp_path):
    write_config(tmp_path, SHIPPED)
    defaults = read_sampling_defaults("auto", tmp_path)
    assert defaults == SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, max_tokens=9)


def test_vllm_turns_the_defaults_off(tmp_path):
    write_config(tmp_path, SHIPPED)
    assert read_sampling_defaults("vllm", tmp_path) == SamplingDefaults()


def test_a_directory_setting_reads_that_directorys_file(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    write_config(other, {"temperature": 0.1})
    assert read_sampling_defaults(str(other), tmp_path / "model") == SamplingDefaults(temperature=0.1)
    with pytest.raises(ValueError, match=r"no generation_config\.json"):
        read_sampling_defaults(str(tmp_path / "missing"), tmp_path)


def test_no_file_no_defaults_and_bad_values_are_skipped(tmp_path):
    assert read_sampling_defaults("auto", tmp_path) == SamplingDefaults()
    write_config(tmp_path, {"temperature": "hot", "top_p": 0, "top_k": 1.5, "max_new_tokens": 0, "min_p": 0.05})
    assert read_sampling_defaults("auto", tmp_path) == SamplingDefaults(min_p=0.05)


def test_unset_fields_take_the_defaults_and_set_fields_win():
    defaults = SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20, min_p=0.1, repetition_penalty=1.05)
    (unset,) = sampling_params(ChatCompletionRequest(messages=USER), max_tokens=5, logprobs=None, defaults=defaults)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.min_p, unset.repetition_penalty) == (
        0.7,
        0.8,
        20,
        0.1,
        1.05,
    )
    explicit = ChatCompletionRequest(messages=USER, temperature=0, top_p=1, top_k=0, min_p=0, repetition_penalty=1.0)
    (chosen,) = sampling_params(explicit, max_tokens=5, logprobs=None, defaults=defaults)
    assert (chosen.temperature, chosen.top_p, chosen.top_k, chosen.min_p, chosen.repetition_penalty) == (
        0,
        1,
        0,
        0,
        1.0,
    )
    (neutral,) = sampling_params(ChatCompletionRequest(messages=USER), max_tokens=5, logprobs=None)
    assert (neutral.temperature, neutral.top_p, neutral.top_k, neutral.min_p, neutral.repetition_penalty) == (
        1.0,
        1.0,
        0,
        0.0,
        1.0,
    )


async def test_routes_apply_the_runtimes_defaults(vlserve_client, fake_runtime):
    """``max_new_tokens`` is the default length (capped by 16 for legacy completions);
    a request's own fields win."""
    fake_runtime.sampling_defaults = SamplingDefaults(temperature=0.3, top_k=4, max_tokens=7)
    await vlserve_client.chat.completions.create(model="fake-model", messages=USER)
    await vlserve_client.chat.completions.create(model="fake-model", messages=USER, temperature=1.5, max_tokens=30)
    await vlserve_client.completions.create(model="fake-model", prompt="hi")
    (_, unset), (_, explicit), (_, legacy) = fake_runtime.engine.opened
    assert (unset.temperature, unset.top_k, unset.max_tokens) == (0.3, 4, 7)
    assert (explicit.temperature, explicit.top_k, explicit.max_tokens) == (1.5, 4, 30)
    assert legacy.max_tokens == 7
