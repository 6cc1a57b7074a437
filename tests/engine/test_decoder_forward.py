"""The engine's own language-model forward (engine/decoder_forward.py) computes what
transformers' forward over the padded batch (engine/padded_forward.py) computes, and
models it does not cover keep transformers' forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional

from engine import token_batch
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


@pytest.mark.parametrize("decode_groups", ["cost", "one per row"])
def test_own_forward_gives_transformers_logits_for_every_kind_of_row(family, decode_groups, monkeypatch):
    """Invariant: for fresh prompts, a prompt's first and continuing chunks, a one-token
    chunk, a forward mixing a chunk with an output token, and decode forwards, the engine's
    own forward (unpadded rows) returns the logits of transformers' forward over the same
    rows left-padded, within float32 rounding; both write the same keys and values. Decode
    attention split by context length (``one per row``: groups cost nothing, so each row
    of a different length is a group of its own) changes none of it."""
    if decode_groups == "one per row":
        monkeypatch.setattr(token_batch, "GROUP_OVERHEAD_ELEMENTS", 0)
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


def _decode_batch(contexts: list[int], block_size: int = 4) -> token_batch.TokenBatch:
    """A decode batch whose row ``b`` has ``contexts[b]`` tokens (its last one new), rows'
    blocks numbered in order."""
    widths = [-(-c // block_size) for c in contexts]
    tables, at = [], 0
    for width in widths:
        tables.append(list(range(at, at + width)) + [999] * (max(widths) - width))
        at += width
    return token_batch.TokenBatch(
        embeds=torch.zeros(len(contexts), 8),
        positions=torch.zeros(1, len(contexts), dtype=torch.long),
        slots=torch.zeros(len(contexts), dtype=torch.long),
        block_tables=torch.tensor(tables),
        starts=tuple(c - 1 for c in contexts),
        lengths=(1,) * len(contexts),
        block_size=block_size,
    )


def test_decode_groups_cut_rows_by_context_and_each_masks_its_own_width():
    """Rows sorted by context, cut into equal counts: every row in exactly one group, each
    group's blocks its rows' own up to its longest context, and its mask letting row ``b``
    see exactly its ``contexts[b]`` slots. Contexts alike, or groups too costly: one group,
    the whole batch in order."""
    contexts = [400, 9, 30, 410, 12, 390, 33, 8]
    groups = _decode_batch(contexts).decode_groups(torch.float32, key_elements=64)
    assert len(groups) > 1
    seen = sorted(int(row) for group in groups for row in group.rows)
    assert seen == list(range(len(contexts)))
    longest = [max(contexts[int(r)] for r in group.rows) for group in groups]
    assert longest == sorted(longest)
    for group in groups:
        assert group.tables.shape[1] == -(-max(contexts[int(r)] for r in group.rows) // 4)
        for i, row in enumerate(group.rows.tolist()):
            visible = (group.mask[i, 0, 0] == 0).nonzero().flatten().tolist()
            assert visible == list(range(contexts[row]))
    (whole,) = _decode_batch([100, 101, 99, 102]).decode_groups(torch.float32, key_elements=64)
    assert whole.rows is None and whole.tables.shape == (4, 26)
    (costly,) = _decode_batch(contexts).decode_groups(torch.float32, key_elements=1)
    assert costly.rows is None


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
