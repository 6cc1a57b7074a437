"""Runs the language model over the running batch: prefill of joining rows, decode of all.

The runner owns the batch KV cache, the attention mask that hides each row's left
padding, and the next position of each row (its own M-RoPE delta included). It is plain
synchronous code; the engine calls it from its step thread only, one call at a time.
"""

from __future__ import annotations

import torch

from engine.kv_cache import cache_nbytes, merge_caches, new_batch_cache
from engine.model_adapter import CausalLMAdapter
from engine.sequence import Sequence


class ModelRunner:
    def __init__(self, adapter: CausalLMAdapter, device: torch.device) -> None:
        self.adapter = adapter
        self.device = device
        self._cache = None
        self._mask: torch.Tensor | None = None  # [B, T] long, 1 = real token
        self._rows: list[Sequence] = []
        self._next_pos: list[int] = []

    @property
    def rows(self) -> list[Sequence]:
        return list(self._rows)

    def cache_tokens(self) -> int:
        """Cache slots held (rows x padded length)."""
        mask = self._mask  # read once: the step thread may replace it meanwhile
        return 0 if mask is None else int(mask.numel())

    def cache_bytes(self) -> int:
        return cache_nbytes(self._cache)

    def reset(self) -> None:
        """Forget every row and the whole cache (after an unexpected failure)."""
        self._cache, self._mask, self._rows, self._next_pos = None, None, [], []

    @torch.inference_mode()
    def drop(self, leaving: list[Sequence]) -> None:
        """Remove ``leaving`` rows from the cache and trim padding no row needs any more."""
        if not leaving or not self._rows:
            return
        gone = {id(s) for s in leaving}
        keep = [i for i, s in enumerate(self._rows) if id(s) not in gone]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        self._next_pos = [self._next_pos[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        used = self._mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else self._mask.shape[1]
        if first > 0:
            for layer in self._cache.layers:
                layer.trim_left(first)
            self._mask = self._mask[:, first:]

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each row's last sampled token; return next-token logits [B, V]."""
        if [id(s) for s in seqs] != [id(s) for s in self._rows]:
            raise RuntimeError("decode batch does not match the cached rows")
        ids = torch.tensor([s.output_ids[-1] for s in seqs], dtype=torch.long, device=self.device)
        embeds = self.adapter.embed_tokens(ids).unsqueeze(1)
        positions = torch.tensor(self._next_pos, dtype=torch.long, device=self.device).view(1, -1, 1)
        ones = torch.ones((len(seqs), 1), dtype=self._mask.dtype, device=self.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        logits = self.adapter.forward(embeds, positions, self._mask, self._cache)
        self._next_pos = [p + 1 for p in self._next_pos]
        return logits

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Run the prompts of ``seqs`` (left-padded together), add them to the batch, and
        return the logits [k, V] of each prompt's last position."""
        embeds, positions, lengths, deltas = [], [], [], []
        for seq in seqs:
            embeds.append(self.adapter.embed_prompt(seq.prompt, self.device))
            pos, delta = self.adapter.prompt_positions(seq.prompt, self.device)
            positions.append(pos)
            lengths.append(len(seq.prompt.token_ids))
            deltas.append(delta)
        longest = max(lengths)
        rows = self.adapter.position_rows
        hidden = embeds[0].shape[-1]
        batch_embeds = embeds[0].new_zeros((len(seqs), longest, hidden))
        batch_pos = torch.zeros((rows, len(seqs), longest), dtype=torch.long, device=self.device)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long, device=self.device)
        for i, (e, p, n) in enumerate(zip(embeds, positions, lengths, strict=True)):
            batch_embeds[i, longest - n :] = e
            batch_pos[:, i, longest - n :] = p.expand(rows, -1) if p.shape[0] == 1 else p
            mask[i, longest - n :] = 1
        cache = new_batch_cache(self.adapter.num_layers)
        logits = self.adapter.forward(batch_embeds, batch_pos, mask, cache)

        self._cache = merge_caches(self._cache, cache)
        self._mask = _merge_masks(self._mask, mask)
        for seq, n, delta in zip(seqs, lengths, deltas, strict=True):
            seq.rope_delta = delta
            self._rows.append(seq)
            self._next_pos.append(n + delta)
        return logits


def _merge_masks(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    if a is None:
        return b
    length = max(a.shape[1], b.shape[1])
    a = torch.nn.functional.pad(a, (length - a.shape[1], 0))
    b = torch.nn.functional.pad(b, (length - b.shape[1], 0))
    return torch.cat([a, b], dim=0)
