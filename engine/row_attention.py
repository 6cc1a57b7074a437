"""Prefill attention row by row, without padding, instead of one masked attention over the batch.

A prefill forward's rows are left-padded to the step's longest chunk (``engine.model_runner``),
and with a dense mask every row pays attention over ``longest x context`` positions: for
the benchmark's prompts of 55 to 370 tokens, the tiny model's prefill spent half its time
in that attention. Run row by row, each row attends over its own tokens only, and a chunk
that starts a prompt is plain causal attention, which the fused kernel computes without a
mask and without the upper triangle: 4.1 ms instead of 10.1 ms for 11 such rows on one
thread (``python -m bench.step_loop`` shows what it does to the engine's throughput).

How it plugs in: transformers picks a model's attention function by name from its
``AttentionInterface`` registry. ``install_row_attention`` registers ``row_attention``
under ``ROW_ATTENTION`` and selects it for the language model's layers only (the vision
tower keeps its own). For a prefill forward the runner passes a ``PrefillRows`` where the
mask would go; ``row_attention`` then attends row by row. Anything else (a decode
forward's dense mask) goes to transformers' own SDPA function unchanged, so decode is
exactly as before. Models with sliding-window layers are left on SDPA: ``PrefillRows``
knows no windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ROW_ATTENTION = "vlserve_prefill_rows"
_REPLACES = "sdpa"


@dataclass(frozen=True)
class PrefillRows:
    """Where each row of a prefill forward sits: its chunk of ``lengths[b]`` tokens is the
    last ``lengths[b]`` of ``longest`` query positions (left padding), and its tokens
    follow ``starts[b]`` tokens already in the cache, so its keys are the first
    ``starts[b] + lengths[b]`` context positions."""

    lengths: tuple[int, ...]
    starts: tuple[int, ...]
    longest: int

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
        """Attention output [B, longest, heads, head_dim] (the layout transformers' attention
        functions return) for ``query`` [B, heads, longest, d] and ``key``/``value``
        [B, kv_heads, context, d]. A row's query at chunk position ``i`` sees its context
        positions ``0..starts[b] + i``; padded query positions get zeros."""
        out = query.new_zeros(query.shape)
        grouped = query.shape[1] != key.shape[1]
        for row, (n, start) in enumerate(zip(self.lengths, self.starts, strict=True)):
            context = start + n
            q = query[row : row + 1, :, self.longest - n :]
            k = key[row : row + 1, :, :context]
            v = value[row : row + 1, :, :context]
            if start == 0:
                attended = functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=scale, enable_gqa=grouped
                )
            else:  # causal, aligned to the end: query i sees keys 0..start + i
                sees = torch.arange(context, device=q.device) <= (start + torch.arange(n, device=q.device)).unsqueeze(1)
                attended = functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=sees, scale=scale, enable_gqa=grouped
                )
            out[row : row + 1, :, self.longest - n :] = attended
        return out.transpose(1, 2).contiguous()


def row_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | PrefillRows | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An attention function for transformers' registry: ``PrefillRows`` attend row by row,
    anything else goes to transformers' SDPA function as it is."""
    if isinstance(attention_mask, PrefillRows):
        return attention_mask.attend(query, key, value, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def install_row_attention(model: torch.nn.Module) -> bool:
    """Select ``row_attention`` for ``model``'s language-model layers if they use SDPA and
    no sliding window; ``True`` if they now use it (the runner may pass ``PrefillRows``)."""
    config = model.config.get_text_config()
    if getattr(config, "_attn_implementation", None) == ROW_ATTENTION:
        return True
    if getattr(config, "_attn_implementation", None) != _REPLACES:
        return False
    layer_types = getattr(config, "layer_types", None) or ()
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        return False
    AttentionInterface.register(ROW_ATTENTION, row_attention)  # idempotent: a dict entry
    config._attn_implementation = ROW_ATTENTION
    return True
