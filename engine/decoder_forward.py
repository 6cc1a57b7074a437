"""The language model's forward written here, over a flat ``TokenBatch``, for the Qwen2
decoder layout (docs/architecture.md, "KV cache").

transformers' forward takes a rectangular batch: a prefill forward's rows are left-padded
to the step's longest chunk, so every linear layer, norm, rotary product and MLP of the
benchmark's prefill ran over about twice its real tokens, and each attention layer
gathered every row's context padded to the widest one. This forward runs the same
modules' weights over the batch's real tokens only, ``[T, hidden]``: linear layers, norms
and MLPs see each token once, a prefill row attends over its own context
(``attend_row``; a chunk that starts its sequence needs no gather at all: its keys are
the ones just computed), and a decode batch attends at once over the
rows' contexts gathered whole from the paged cache with a mask. The logits are those of
each row's last token only. The step loop alone on the text workload: 1.26-1.36x the
requests per second of transformers' padded forward (bench/README.md, "The language
model's forward over real tokens only").

What it computes is transformers' forward for these layers, operation for operation
(pre-norm residual blocks; q, k and v projections with the model's biases, rotate-half
RoPE with the cos and sin of the model's own rotary module, so M-RoPE sections and rope
scaling stay the model's; SDPA with the layer's scaling and grouped-query heads; o
projection; the gated MLP with the model's activation; the final norm; the LM head), and
the norms and activation are the model's own modules. ``DecoderForward.for_model`` takes a
model only if its decoder layers are of a class known to have this layout and none uses a
sliding window; any other model keeps transformers' forward (``engine.padded_forward``).
``tests/engine/test_decoder_forward.py`` checks the logits and the cache contents against
transformers' forward for fresh, continuing, one-token, mixed and decode rows of each
family it covers; every engine test against ``generate()`` runs through it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from engine.paged_kv_cache import PagedKVCache
from engine.token_batch import DecodeGroup, TokenBatch

# decoder layers whose forward is the layout above (transformers 5.x)
QWEN2_LAYOUT_LAYERS = frozenset({"Qwen2DecoderLayer", "Qwen2VLDecoderLayer", "Qwen2_5_VLDecoderLayer"})


def attend_row(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, start: int, scale: float | None
) -> torch.Tensor:
    """Attention [1, heads, n, d] of one row's ``n`` new queries [1, heads, n, d] over its
    context keys and values [1, kv_heads, start + n, d], the queries being its last ``n``
    positions: query ``i`` sees keys ``0..start + i``. A chunk that starts the row
    (``start == 0``) is plain causal attention, which SDPA computes without a mask and
    without the upper triangle."""
    grouped = query.shape[1] != key.shape[1]
    if start == 0:
        return functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale, enable_gqa=grouped
        )
    n, context = query.shape[2], key.shape[2]
    sees = torch.arange(context, device=query.device) <= (start + torch.arange(n, device=query.device)).unsqueeze(1)
    return functional.scaled_dot_product_attention(query, key, value, attn_mask=sees, scale=scale, enable_gqa=grouped)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``rotate_half``: ``(-x2, x1)`` for the halves ``x1, x2`` of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderForward:
    """The forward of ``model``'s language model over a ``TokenBatch``: logits [B, V]
    (float32) of each row's last token, every token's keys and values written to the
    cache on the way. Holds the modules, never copies of their weights (``model.to`` keeps
    working)."""

    def __init__(self, model: nn.Module) -> None:
        self.text_model = language_model(model)
        self.layers = list(self.text_model.layers)
        self.lm_head = model.lm_head

    @classmethod
    def for_model(cls, model: nn.Module) -> DecoderForward | None:
        """A ``DecoderForward`` for ``model`` if every decoder layer is of a class in
        ``QWEN2_LAYOUT_LAYERS`` and no layer uses a sliding window; else ``None``."""
        text = language_model(model)
        layers = getattr(text, "layers", None)
        if text is None or not layers or not hasattr(model, "lm_head") or not hasattr(text, "rotary_emb"):
            return None
        if any(type(layer).__name__ not in QWEN2_LAYOUT_LAYERS for layer in layers):
            return None
        config = model.config.get_text_config()
        layer_types = getattr(config, "layer_types", None) or ()
        if getattr(config, "use_sliding_window", False) or "sliding_attention" in layer_types:
            return None
        return cls(model)

    def __call__(self, batch: TokenBatch, cache: PagedKVCache) -> torch.Tensor:
        hidden = batch.embeds
        cos, sin = self._rotary(batch)
        groups = batch.decode_groups(hidden.dtype, cache.key_elements) if batch.is_decode else None
        for index, layer in enumerate(self.layers):
            attention, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(hidden)
            attended = self._attention(index, attention, x, cos, sin, batch, cache, groups)
            hidden = hidden + functional.linear(attended, attention.o_proj.weight, attention.o_proj.bias)
            x = layer.post_attention_layernorm(hidden)
            gate = mlp.act_fn(functional.linear(x, mlp.gate_proj.weight)) * functional.linear(x, mlp.up_proj.weight)
            hidden = hidden + functional.linear(gate, mlp.down_proj.weight)
        last = self.text_model.norm(hidden.index_select(0, batch.last_tokens))
        return functional.linear(last, self.lm_head.weight, self.lm_head.bias).float()

    def _rotary(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, head_dim] of every token, from the model's rotary module."""
        positions = batch.positions  # M-RoPE: 3 rows, [3, 1, T] for the module; else [1, T]
        ids = positions.unsqueeze(1) if positions.shape[0] == 3 else positions
        cos, sin = self.text_model.rotary_emb(batch.embeds, ids)
        return cos[0].unsqueeze(1), sin[0].unsqueeze(1)

    @staticmethod
    def _attention(
        index: int,
        attention: nn.Module,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: TokenBatch,
        cache: PagedKVCache,
        decode_groups: tuple[DecodeGroup, ...] | None,
    ) -> torch.Tensor:
        """Layer ``index``'s attention output [T, heads x head_dim] for the normed input
        ``x`` [T, hidden]; the new keys and values go to the cache first. A decode batch
        (``decode_groups``) attends group by group, each over its rows' contexts gathered
        whole and padded to the group's longest."""
        tokens, dim = x.shape[0], attention.head_dim
        q = functional.linear(x, attention.q_proj.weight, attention.q_proj.bias).view(tokens, -1, dim)
        k = functional.linear(x, attention.k_proj.weight, attention.k_proj.bias).view(tokens, -1, dim)
        v = functional.linear(x, attention.v_proj.weight, attention.v_proj.bias).view(tokens, -1, dim)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        cache.write(index, batch.slots, k, v)
        kv_heads, scale = k.shape[1], attention.scaling
        if decode_groups is not None:  # one query per row: grouped heads packed as queries of their kv head
            packed = q.view(tokens, kv_heads, -1, dim)
            if len(decode_groups) == 1:
                return _attend_decode(packed, decode_groups[0], index, cache, scale).reshape(tokens, -1)
            out = torch.empty_like(packed)
            for group in decode_groups:
                rows = group.rows
                out.index_copy_(0, rows, _attend_decode(packed.index_select(0, rows), group, index, cache, scale))
            return out.reshape(tokens, -1)
        out = torch.empty_like(q)
        for row, (offset, n, start) in enumerate(zip(batch.offsets, batch.lengths, batch.starts, strict=True)):
            if start == 0:  # the row's whole context is this chunk
                keys, values = k[offset : offset + n], v[offset : offset + n]
            else:
                keys, values = cache.gather(index, batch.context_blocks(row))
                keys, values = keys[: start + n], values[: start + n]
            attended = attend_row(
                q[offset : offset + n].transpose(0, 1).unsqueeze(0),
                keys.transpose(0, 1).unsqueeze(0),
                values.transpose(0, 1).unsqueeze(0),
                start,
                scale,
            )
            out[offset : offset + n] = attended[0].transpose(0, 1)
        return out.view(tokens, -1)


def _attend_decode(
    packed: torch.Tensor, group: DecodeGroup, layer: int, cache: PagedKVCache, scale: float | None
) -> torch.Tensor:
    """Attention [n, kv_heads, group size, dim] of one decode group's queries ``packed``
    (each kv head's grouped query heads packed as its queries) over the group's contexts."""
    rows, kv_heads, _, dim = packed.shape
    keys, values = cache.gather(layer, group.tables.reshape(-1))
    keys = keys.view(rows, -1, kv_heads, dim).transpose(1, 2)
    values = values.view(rows, -1, kv_heads, dim).transpose(1, 2)
    return functional.scaled_dot_product_attention(packed, keys, values, attn_mask=group.mask, scale=scale)


def language_model(model: nn.Module) -> nn.Module | None:
    """The decoder stack (``layers``, ``norm``, ``rotary_emb``) of a causal LM or of a VL
    model's language part."""
    inner = getattr(model, "model", None)
    return getattr(inner, "language_model", inner)
