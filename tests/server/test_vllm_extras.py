"""vLLM's extra sampling fields on the real tiny model, through the official client's
``extra_body``: ``logit_bias`` (OpenAI's), ``stop_token_ids``, ``min_tokens``,
``skip_special_tokens``. Each test forces the model with a bias, so the outcome does not
depend on the random weights."""

from __future__ import annotations

import openai
import pytest

from tests.server.real_runtime import model_name, vlserve_config, vlserve_runtime_factory  # noqa: F401

USER = [{"role": "user", "content": "Say something."}]
TOKEN = 300  # an ordinary BPE token of the tiny tokenizer


async def test_logit_bias_forces_a_token(vlserve_client, model_name, tiny_model):
    completion = await vlserve_client.chat.completions.create(
        model=model_name,
        messages=USER,
        max_tokens=5,
        temperature=1.0,
        logit_bias={str(TOKEN): 100},
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    tokens = [entry.token for entry in completion.choices[0].logprobs.content]
    assert len(tokens) == 5 and len(set(tokens)) == 1
    assert completion.choices[0].message.content == tiny_model.tokenizer.decode([TOKEN] * 5)


async def test_stop_token_ids_and_min_tokens(vlserve_client, model_name):
    """The forced token stops at once as a stop token; with ``min_tokens=3`` it (and the
    end-of-sequence tokens) are barred for three tokens, then it comes and stops."""
    forced = {"logit_bias": {str(TOKEN): 100}}
    first = await vlserve_client.completions.create(
        model=model_name, prompt="a", max_tokens=8, extra_body={"stop_token_ids": [TOKEN]}, **forced
    )
    assert first.choices[0].finish_reason == "stop" and first.usage.completion_tokens == 1
    later = await vlserve_client.chat.completions.create(
        model=model_name, messages=USER, max_tokens=8, extra_body={"stop_token_ids": [TOKEN], "min_tokens": 3}, **forced
    )
    assert later.choices[0].finish_reason == "stop" and later.usage.completion_tokens == 4


async def test_skip_special_tokens(vlserve_client, model_name, tiny_model):
    special = tiny_model.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    texts = []
    for skip in (True, False):
        completion = await vlserve_client.completions.create(
            model=model_name,
            prompt="a",
            max_tokens=2,
            logit_bias={str(special): 100},
            extra_body={"skip_special_tokens": skip, "ignore_eos": True},
        )
        texts.append(completion.choices[0].text)
    assert texts == ["", "<|vision_start|><|vision_start|>"]


async def test_include_stop_str_in_output(vlserve_client, model_name, tiny_model):
    piece = tiny_model.tokenizer.decode([TOKEN])
    texts = []
    for include in (False, True):
        completion = await vlserve_client.completions.create(
            model=model_name,
            prompt="a",
            max_tokens=4,
            stop=[piece],
            logit_bias={str(TOKEN): 100},
            extra_body={"include_stop_str_in_output": include},
        )
        assert completion.choices[0].finish_reason == "stop"
        texts.append(completion.choices[0].text)
    assert texts == ["", piece]


async def test_prompt_as_token_ids(vlserve_client, model_name, tiny_model):
    """Token ids (one list, or a list of lists) generate what the same text does; ``echo``
    gives them back as text; an id the tokenizer lacks is a 400 naming the prompt."""
    ids = tiny_model.tokenizer("hello world", add_special_tokens=True)["input_ids"]
    by_text = await vlserve_client.completions.create(
        model=model_name, prompt="hello world", max_tokens=6, temperature=0
    )
    by_ids = await vlserve_client.completions.create(model=model_name, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    both = await vlserve_client.completions.create(
        model=model_name, prompt=[ids, ids[:1]], max_tokens=6, temperature=0, echo=True
    )
    assert both.choices[0].text == "hello world" + by_text.choices[0].text
    assert both.choices[1].text.startswith(tiny_model.tokenizer.decode(ids[:1]))
    with pytest.raises(openai.BadRequestError) as raised:
        await vlserve_client.completions.create(
            model=model_name, prompt=[ids, [len(tiny_model.tokenizer)]], max_tokens=2
        )
    assert raised.value.body["param"] == "prompt[1]" and raised.value.body["code"] == "token_out_of_vocabulary"


async def test_image_placeholder_ids_fare_as_in_a_text_prompt(vlserve_client, model_name, tiny_model):
    """An image placeholder id without an image is treated as the same token written in a
    text prompt: no server error, and the server keeps serving."""
    pad = tiny_model.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    by_ids = await vlserve_client.completions.create(model=model_name, prompt=[1, pad, 2], max_tokens=2, temperature=0)
    by_text = await vlserve_client.completions.create(
        model=model_name, prompt=tiny_model.tokenizer.decode([1, pad, 2]), max_tokens=2, temperature=0
    )
    assert by_ids.choices[0].text == by_text.choices[0].text
    again = await vlserve_client.completions.create(model=model_name, prompt="still fine", max_tokens=2)
    assert again.choices[0].finish_reason in ("stop", "length")
