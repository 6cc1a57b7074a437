"""The engine's own language-model forward (engine/decoder_forward.py) computes what
transformers' forward over the padded batch (engine/padded_forward.py) computes, and
models it does not cover keep transformers' forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional

from engine.block_manager import BlockManager
from engine.decoder_forward import DecoderForward, attend_row
from engine.model_adapter import adapter_for
from engine.model_loader import load_model
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from tests.engine.prompts import chat_prompt, reference_generate
from tests.engine.test_model_families import greedy, save_causal_lm, save_qwen2_causal, save_qwen25_vl

TEXTS = ("hello world, how are you today?", "one two three four five six seven eight nine ten", "a")


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_a_row_attends_as_a_dense_mask_makes_it(kv_heads):
    """A fresh prompt, a continuing chunk, a prefix-cache hit and a one-token chunk: each
    query gets what SDPA with the dense mask (query ``i`` at position ``start + i`` sees
    context positions ``0..start + i``) gives it."""
    torch.manual_seed(0)
    for n, start in ((7, 0), (3, 4), (5, 9), (1, 2)):
        query = torch.randn(1, 4, n, 16)
        key, value = torch.randn(1, kv_heads, start + n, 16), torch.randn(1, kv_heads, start + n, 16)
        mask = torch.full((1, 1, n, start + n), torch.finfo(torch.float32).min)
        for i in range(n):
            mask[0, 0, i, : start + i + 1] = 0.0
        expected = functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=0.25, enable_gqa=kv_heads != 4
        )
        torch.testing.assert_close(attend_row(query, key, value, start, 0.25), expected, rtol=1e-5, atol=1e-5)


def save_llama_causal(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    return save_causal_lm(path, LlamaConfig, LlamaForCausalLM)


@pytest.fixture(params=["qwen2-vl", "qwen2", "qwen2.5-vl"])
def family(request, tiny_model, tiny_model_dir, tmp_path):
    if request.param == "qwen2-vl":
        return tiny_model
    if request.param == "qwen2":
        return load_model(save_qwen2_causal(tmp_path / "qwen2"))
    return load_model(save_qwen25_vl(tmp_path / "qwen25", tiny_model_dir))


def runner(adapter, device) -> ModelRunner:
    return ModelRunner(adapter, device, BlockManager(64, 4, prefix_caching=False))


def test_own_forward_gives_transformers_logits_for_every_kind_of_row(family):
    """Invariant: for fresh prompts, a prompt's first and continuing chunks, a one-token
    chunk, a forward mixing a chunk with an output token, and decode forwards, the engine's
    own forward (unpadded rows) returns the logits of transformers' forward over the same
    rows left-padded, within float32 rounding; both write the same keys and values."""
    own_adapter = family.adapter
    assert own_adapter.decoder is not None
    theirs_adapter = adapter_for(copy.deepcopy(family.model), own_forward=False)
    assert theirs_adapter.decoder is None
    own, theirs = runner(own_adapter, family.device), runner(theirs_adapter, family.device)
    prompts = [chat_prompt(family, text)[0] for text in TEXTS]
    seqs = {
        name: [Sequence(i, prompt, SamplingParams(max_tokens=8)) for i, prompt in enumerate(prompts)]
        for name in ("own", "theirs")
    }

    def forward(rows: list[tuple[int, int]]) -> None:
        """Run rows ``(sequence index, n)`` through both runners and compare; every row
        whose tokens are then all in the cache gets the same next token in both."""
        logits = {}
        for name, run in (("own", own), ("theirs", theirs)):
            chosen = [(seqs[name][i], n) for i, n in rows]
            for seq, n in chosen:
                run.blocks.allocate(seq, seq.num_computed_tokens + n)
            logits[name] = run.forward(chosen)
        torch.testing.assert_close(logits["own"], logits["theirs"], rtol=1e-4, atol=1e-4)
        for row, (i, _) in enumerate(rows):
            if seqs["own"][i].num_computed_tokens == seqs["own"][i].num_tokens:
                token = int(logits["theirs"][row].argmax())
                for name in seqs:
                    seqs[name][i].output_ids.append(token)

    first_chunk = 5
    forward([(0, len(prompts[0].token_ids)), (1, first_chunk)])  # a whole prompt, a first chunk
    forward([(1, len(prompts[1].token_ids) - first_chunk), (2, 1)])  # the continuing chunk, a 1-token chunk
    forward([(0, 1), (2, len(prompts[2].token_ids) - 1)])  # an output token beside a continuing chunk
    for _ in range(6):
        forward([(i, 1) for i in range(3)])  # decode
    for i, seq in enumerate(seqs["own"]):
        assert seq.block_table == seqs["theirs"][i].block_table
        slots = torch.tensor([seq.block_table[t // 4] * 4 + t % 4 for t in range(seq.num_computed_tokens)])
        for layer in range(own_adapter.num_layers):
            for mine, yours in (
                (own.cache.key_pools, theirs.cache.key_pools),
                (own.cache.value_pools, theirs.cache.value_pools),
            ):
                torch.testing.assert_close(mine[layer][slots], yours[layer][slots], rtol=1e-4, atol=1e-4)


async def test_models_of_another_layout_keep_transformers_forward_and_batch_like_generate(tmp_path):
    """A Llama model is not in ``QWEN2_LAYOUT_LAYERS``: it runs transformers' forward over
    the padded batch, and its greedy outputs in one batch equal ``generate()`` alone."""
    loaded = load_model(save_llama_causal(tmp_path / "llama"))
    assert loaded.adapter.decoder is None
    built = [chat_prompt(loaded, text) for text in TEXTS]
    got = await greedy(loaded, [p for p, _ in built], 10)
    assert got == [reference_generate(loaded, p, extra, 10) for p, extra in built]


def test_a_sliding_window_layer_keeps_transformers_forward(tiny_model):
    model = copy.deepcopy(tiny_model.model)
    assert DecoderForward.for_model(model) is not None
    model.config.get_text_config().layer_types = ["full_attention", "sliding_attention"]
    assert DecoderForward.for_model(model) is None
