"""Runs the language model over a step's rows with the paged KV cache.

Each forward takes rows ``(seq, n)``: the next ``n`` tokens of ``seq`` (its prompt, then
its outputs) from ``seq.num_computed_tokens`` on. A decode is ``n = 1`` (the last sampled
token); a prefill chunk is any ``n``. The runner gathers the rows' new tokens into one flat
``TokenBatch`` (embeddings, positions, the cache slot of each token, each row's block
table) and the adapter runs the model over it (``engine.decoder_forward``, or
transformers' forward over the batch padded, ``engine.padded_forward``); contexts are read
through the block tables, whole blocks (``engine.paged_kv_cache``: positions past a row's
context hold zeros). Positions are explicit (M-RoPE rows from the whole prompt, sliced per
chunk; later tokens at ``t + rope_delta``), so a chunked or prefix-hit prompt gets exactly
the positions and image embeddings of a whole one.

Plain synchronous code, called from the engine's step thread only, one call at a time.
"""

from __future__ import annotations

import torch

from engine.block_manager import BlockManager
from engine.model_adapter import CausalLMAdapter
from engine.paged_kv_cache import PagedKVCache, kv_bytes_per_token
from engine.sequence import Sequence
from engine.token_batch import TokenBatch


def kv_layout(adapter: CausalLMAdapter) -> tuple[int, int, int, torch.dtype]:
    """(layers, kv heads, head dim, dtype) of the model's KV cache."""
    cfg = adapter.text_config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = next(adapter.model.parameters()).dtype
    return adapter.num_layers, kv_heads, head_dim, dtype


def bytes_per_token(adapter: CausalLMAdapter) -> int:
    return kv_bytes_per_token(*kv_layout(adapter))


class ModelRunner:
    """The model, its paged KV cache, and per-row positions. ``blocks`` (shared with the
    scheduler) says which blocks each sequence holds; default: a pool for 64 sequences
    of 4,096 tokens in blocks of 16."""

    def __init__(self, adapter: CausalLMAdapter, device: torch.device, blocks: BlockManager | None = None) -> None:
        self.adapter = adapter
        self.device = device
        self.blocks = blocks or BlockManager(
            64 * 4096 // 16, 16, image_token_id=getattr(adapter, "image_token_id", None)
        )
        layers, kv_heads, head_dim, dtype = kv_layout(adapter)
        self.cache = PagedKVCache(
            num_layers=layers,
            num_blocks=self.blocks.num_blocks,
            block_size=self.blocks.block_size,
            kv_heads=kv_heads,
            head_dim=head_dim,
            dtype=dtype,
            device=device,
        )
        self._rows: dict[int, Sequence] = {}
        self._positions: dict[int, tuple[torch.Tensor, int]] = {}  # seq_id -> prompt positions [P, L], delta

    @property
    def rows(self) -> list[Sequence]:
        """Sequences with tokens in the cache, in the order they first ran."""
        return list(self._rows.values())

    def cache_tokens(self) -> int:
        """Slots in blocks held by sequences (cached-only blocks not counted)."""
        blocks = self.blocks
        return (blocks.num_blocks - blocks.num_free) * blocks.block_size

    def cache_bytes(self) -> int:
        return self.cache.nbytes

    def reset(self) -> None:
        """Forget every row's positions (after an unexpected failure); blocks are the
        scheduler's to free."""
        self._rows.clear()
        self._positions.clear()

    def drop(self, leaving: list[Sequence]) -> None:
        """Forget the rows of ``leaving`` (their blocks are freed by the scheduler)."""
        for seq in leaving:
            self._rows.pop(seq.seq_id, None)
            self._positions.pop(seq.seq_id, None)

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each sequence's last sampled token; return next-token logits [B, V]."""
        return self.forward([(seq, 1) for seq in seqs])

    def prefill(self, chunks: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Run the next ``n`` tokens of each sequence; logits [k, V] of each chunk's last
        token (meaningful where the chunk ends the sequence's tokens)."""
        return self.forward(chunks)

    @torch.inference_mode()
    def forward(self, rows: list[tuple[Sequence, int]]) -> torch.Tensor:
        """One forward over ``rows``; on success each sequence's computed count advances
        by its ``n`` (and its newly full blocks become reusable)."""
        bs = self.blocks.block_size
        starts = [seq.num_computed_tokens for seq, _ in rows]
        lengths = [n for _, n in rows]
        for (seq, n), start in zip(rows, starts, strict=True):
            if len(seq.block_table) * bs < start + n:
                raise RuntimeError(f"sequence {seq.seq_id} has no blocks for tokens {start}..{start + n}")
            self._rows.setdefault(seq.seq_id, seq)
        if all(n == 1 and start >= seq.prompt_len for (seq, n), start in zip(rows, starts, strict=True)):
            embeds, positions = self._decode_inputs(rows, starts)
        else:
            parts = [self._inputs(seq, start, start + n) for (seq, n), start in zip(rows, starts, strict=True)]
            embeds = torch.cat([e for e, _ in parts])
            positions = torch.cat([p for _, p in parts], dim=1)
        # each row reads the blocks that hold its context, whole; a block becomes a row's
        # last block (``fresh``) in the forward that first writes into it
        needed, fresh = [], []
        for (seq, _), start, n in zip(rows, starts, lengths, strict=True):
            need = self.blocks.blocks_for(start + n)
            needed.append(need)
            if need > self.blocks.blocks_for(start):
                fresh.append(seq.block_table[need - 1])
        width = max(needed)
        pad = [self.cache.pad_block]
        padded = [seq.block_table[:need] + pad * (width - need) for (seq, _), need in zip(rows, needed, strict=True)]
        tables = torch.tensor(padded, dtype=torch.long, device=self.device)
        batch = TokenBatch(
            embeds=embeds,
            positions=positions,
            slots=self._slots(tables, starts, lengths),
            block_tables=tables,
            starts=tuple(starts),
            lengths=tuple(lengths),
            block_size=bs,
        )
        self.cache.zero_blocks(fresh)
        logits = self.adapter.forward(batch, self.cache)
        for seq, n in rows:
            self.blocks.computed(seq, n)
        return logits

    def _decode_inputs(self, rows: list[tuple[Sequence, int]], starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, H] and positions [P, B] of one output token per row."""
        ids = [seq.output_ids[start - seq.prompt_len] for (seq, _), start in zip(rows, starts, strict=True)]
        embeds = self.adapter.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.device))
        pos = [start + seq.rope_delta for (seq, _), start in zip(rows, starts, strict=True)]
        positions = torch.tensor(pos, dtype=torch.long, device=self.device).view(1, -1)
        return embeds, positions.expand(self.adapter.position_rows, -1)

    def _slots(self, tables: torch.Tensor, starts: list[int], lengths: list[int]) -> torch.Tensor:
        """Cache slot [T] of each new token: row ``b``'s token at context position ``p``
        (``starts[b] <= p < starts[b] + lengths[b]``) goes to slot ``p % block_size`` of the
        row's block ``p // block_size``."""
        device, bs = self.device, self.blocks.block_size
        if all(n == 1 for n in lengths):
            at = torch.tensor(starts, dtype=torch.long, device=device)
            row = torch.arange(len(starts), device=device)
        else:
            at = torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(starts, lengths, strict=True)])
            row = torch.repeat_interleave(
                torch.arange(len(starts), device=device), torch.tensor(lengths, device=device)
            )
        return tables[row, at // bs] * bs + at % bs

    def _inputs(self, seq: Sequence, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [n, H] and positions [P, n] of tokens ``start..end`` of ``seq``."""
        prompt_len = seq.prompt_len
        parts, pos = [], []
        if start < prompt_len:
            stop = min(end, prompt_len)
            parts.append(self.adapter.embed_prompt_range(seq.prompt, start, stop, self.device))
            full, delta = self._prompt_positions(seq)
            p = full[:, start:stop]
            pos.append(p.expand(self.adapter.position_rows, -1) if p.shape[0] == 1 else p)
        else:
            _, delta = self._prompt_positions(seq)
        if end > prompt_len:
            first = max(start, prompt_len)
            ids = seq.output_ids[first - prompt_len : end - prompt_len]
            parts.append(self.adapter.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.device)))
            p = torch.arange(first, end, device=self.device) + delta
            pos.append(p.view(1, -1).expand(self.adapter.position_rows, -1))
        return torch.cat(parts), torch.cat(pos, dim=1)

    def _prompt_positions(self, seq: Sequence) -> tuple[torch.Tensor, int]:
        known = self._positions.get(seq.seq_id)
        if known is None:
            known = self.adapter.prompt_positions(seq.prompt, self.device)
            self._positions[seq.seq_id] = known
            seq.rope_delta = known[1]
        return known
