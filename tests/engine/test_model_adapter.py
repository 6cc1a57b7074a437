"""The adapter passes the KV cache under the name the installed transformers expects."""

from __future__ import annotations

import inspect
import warnings

import torch

from engine.async_engine import open_engine
from engine.model_adapter import cache_keyword
from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams
from tests.engine.configs import in_thread


class OldStyleModel(torch.nn.Module):
    def forward(self, inputs_embeds=None, past_key_values=None, use_cache=None):  # transformers < cache rename
        return None


class NewStyleModel(torch.nn.Module):
    def forward(self, inputs_embeds=None, cache=None, use_cache=None):
        return None


def test_cache_keyword_follows_the_forward_signature(tiny_model):
    assert cache_keyword(OldStyleModel()) == "past_key_values"
    assert cache_keyword(NewStyleModel()) == "cache"
    assert tiny_model.adapter.cache_kwarg in inspect.signature(type(tiny_model.model).forward).parameters


async def test_engine_steps_raise_no_cache_deprecation_warning(tiny_model):
    """Prefill and decode through the real model warn about neither ``past_key_values`` nor
    ``cache_params`` (transformers announces their removal)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with open_engine(tiny_model, in_thread()) as engine:
            async with engine.open_stream(
                EnginePrompt([5, 6, 7, 8]), SamplingParams(max_tokens=4, temperature=0)
            ) as stream:
                tokens = [t async for delta in stream for t in delta.token_ids]
    assert len(tokens) == 4
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "past_key_values" in m or "cache_params" in m], messages
