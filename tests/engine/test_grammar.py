"""Constrained decoding in the engine: a grammar per sequence, masked in the batched
sampler, in the worker process (grammar text over the pickle socket) as in a thread."""

from __future__ import annotations

import json

import llguidance
import pytest
import torch
import trio

from engine.async_engine import open_engine
from engine.grammar import Grammars, allowed_tokens
from engine.sampling_params import SamplingParams
from tests.engine.configs import in_thread, in_worker
from tests.engine.prompts import chat_prompt
from tests.engine.streams import run_stream, wait_until_idle

SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["colour", "n", "ok"],
    "additionalProperties": False,
}


def grammar_of(schema: dict) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})


async def run_mixed(engine, tiny_model):
    """Constrained and free sequences in one batch: greedy, sampled, seeded."""
    prompt = chat_prompt(tiny_model, "give me json")[0]
    grammar = grammar_of(SCHEMA)
    params = {
        "greedy": SamplingParams(max_tokens=64, temperature=0, grammar=grammar),
        "sampled": SamplingParams(max_tokens=64, temperature=1.0, seed=4, grammar=grammar),
        "hot": SamplingParams(max_tokens=64, temperature=2.0, top_k=50, seed=8, grammar=grammar),
        "free": SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
    }
    results = {}

    async def one(key):
        deltas = await run_stream(engine, prompt, params[key])
        results[key] = ("".join(d.text for d in deltas), deltas[-1].finish_reason)

    async with trio.open_nursery() as nursery:
        for key in params:
            nursery.start_soon(one, key)
    return results


@pytest.mark.parametrize("placement", [in_thread, in_worker], ids=["thread", "worker"])
async def test_constrained_rows_match_the_schema_beside_free_rows(tiny_model, placement):
    """Every constrained sequence stops on its own with compact JSON that matches the
    schema, whatever its sampling; the free sequence in the same batch is untouched."""
    async with open_engine(tiny_model, placement()) as engine:
        results = await run_mixed(engine, tiny_model)
        await wait_until_idle(engine, timeout=10)
    for key in ("greedy", "sampled", "hot"):
        text, finish = results[key]
        value = json.loads(text)
        assert finish == "stop"
        assert value["colour"] in ("red", "green", "blue") and 0 <= value["n"] <= 99 and isinstance(value["ok"], bool)
        assert text == json.dumps(value, separators=(",", ":"))  # compact: no free whitespace
    assert results["free"][1] == "length"


async def test_worker_and_thread_agree(tiny_model):
    async with open_engine(tiny_model, in_worker()) as engine:
        worker = await run_mixed(engine, tiny_model)
    async with open_engine(tiny_model, in_thread()) as engine:
        thread = await run_mixed(engine, tiny_model)
    assert worker == thread


def test_mask_allows_only_grammar_tokens_and_leaves_free_rows(tiny_model):
    grammars = Grammars(tiny_model.tokenizer.backend_tokenizer, tiny_model.eos_token_ids)
    matcher = grammars.matcher(grammar_of({"type": "boolean"}))
    vocab = grammars.vocab_size + 16  # the model's logits are wider than the tokenizer
    mask = allowed_tokens([(None, ()), (matcher, ())], vocab, grammars)
    assert mask.shape == (2, vocab) and bool(mask[0].all())
    allowed = [tiny_model.tokenizer.decode([i]) for i in torch.nonzero(mask[1]).flatten().tolist()]
    assert allowed and all("true".startswith(t) or "false".startswith(t) for t in allowed)
    assert not bool(mask[1, grammars.vocab_size :].any())
    assert allowed_tokens([(None, ()), (None, ())], vocab, grammars) is None


def test_a_grammar_compiles_once_and_each_sequence_gets_its_own_state(tiny_model):
    grammars = Grammars(tiny_model.tokenizer.backend_tokenizer, tiny_model.eos_token_ids)
    grammar = grammar_of({"type": "boolean"})
    first, second = grammars.matcher(grammar), grammars.matcher(grammar)
    assert len(grammars._compiled) == 1
    for token in tiny_model.tokenizer("true", add_special_tokens=False)["input_ids"]:
        first.accept(token)
    assert first.done and not second.done


def test_a_broken_matcher_allows_only_end_of_sequence(tiny_model):
    grammars = Grammars(tiny_model.tokenizer.backend_tokenizer, tiny_model.eos_token_ids)
    matcher = grammars.matcher(grammar_of({"type": "boolean"}))
    matcher.accept(tiny_model.tokenizer("{", add_special_tokens=False)["input_ids"][0])  # not allowed
    mask = allowed_tokens([(matcher, ())], grammars.vocab_size, grammars)
    assert set(torch.nonzero(mask[0]).flatten().tolist()) == set(tiny_model.eos_token_ids) and matcher.done
