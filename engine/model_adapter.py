"""What differs between the model families we serve, behind one small interface.

``Qwen2VLAdapter`` covers Qwen2-VL and Qwen2.5-VL (vision tower + M-RoPE); ``CausalLMAdapter``
covers plain decoder LMs (Qwen2, Llama, ...). Only this module and the model runner touch
torch modules. Positions are always explicit (3 rows for M-RoPE, 1 otherwise), and each
sequence carries its own M-RoPE delta: the model's shared ``rope_deltas`` is never used.
A forward runs through ``engine.decoder_forward`` where it covers the model, else through
transformers' own forward over the padded batch (``engine.padded_forward``).
"""

from __future__ import annotations

import inspect

import torch

from engine.decoder_forward import DecoderForward
from engine.errors import RequestRejected
from engine.fused_norm import use_fused_rms_norm
from engine.padded_forward import PaddedBatch
from engine.paged_kv_cache import PagedKVCache
from engine.patch_embed import repeat_frame, use_linear_patch_embed
from engine.prompt import EnginePrompt, ImageFeatures
from engine.token_batch import TokenBatch

VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


class CausalLMAdapter:
    """A text-only decoder LM."""

    position_rows = 1
    supports_images = False

    def __init__(self, model: torch.nn.Module, *, own_forward: bool = True) -> None:
        self.model = model
        self.text_config = model.config.get_text_config()
        self.cache_kwarg = cache_keyword(model)
        self.fused_norms = use_fused_rms_norm(model)  # engine/fused_norm.py
        # the forward written here where it covers the model (``own_forward``), else transformers'
        self.decoder = DecoderForward.for_model(model) if own_forward else None

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(token_ids)

    def embed_prompt(self, prompt: EnginePrompt, device: torch.device) -> torch.Tensor:
        """Embeddings [L, H] of the prompt, image features scattered in (VL models)."""
        if prompt.images:
            raise RequestRejected("This model does not accept images.", kind="images_not_supported", subject="images")
        ids = torch.tensor(prompt.token_ids, dtype=torch.long, device=device)
        return self.embed_tokens(ids)

    def embed_prompt_range(self, prompt: EnginePrompt, start: int, end: int, device: torch.device) -> torch.Tensor:
        """Embeddings [end - start, H] of prompt tokens ``start..end`` (a prefill chunk):
        the rows ``embed_prompt`` would give there."""
        if prompt.images:
            raise RequestRejected("This model does not accept images.", kind="images_not_supported", subject="images")
        return self.embed_tokens(torch.tensor(prompt.token_ids[start:end], dtype=torch.long, device=device))

    def prompt_positions(self, prompt: EnginePrompt, device: torch.device) -> tuple[torch.Tensor, int]:
        """Positions [P, L] of the prompt tokens and the delta to add to later positions."""
        n = len(prompt.token_ids)
        return torch.arange(n, device=device).view(1, n), 0

    def forward(self, batch: TokenBatch, cache: PagedKVCache) -> torch.Tensor:
        """Logits [B, V] (float32) of each row's last token; every token's keys and values
        are written to ``cache`` on the way."""
        if self.decoder is not None:
            return self.decoder(batch, cache)
        padded = PaddedBatch.of(batch, cache.pad_slot)
        cache.bind(padded.slots, batch.block_tables)
        out = self.model(
            inputs_embeds=padded.embeds,
            attention_mask=padded.mask,
            use_cache=True,
            logits_to_keep=1,
            **self._position_arguments(padded.positions),
            **{self.cache_kwarg: cache},
        )
        return out.logits[:, -1, :].float()

    def _position_arguments(self, positions: torch.Tensor) -> dict:
        """The model forward's arguments for the padded positions [1, B, q]."""
        return {"position_ids": positions[0]}


def cache_keyword(model: torch.nn.Module) -> str:
    """The name under which ``model.forward`` takes its KV cache: ``cache`` in recent
    transformers 5.x, where ``past_key_values`` is deprecated (removal announced for 5.40),
    else ``past_key_values``."""
    parameters = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class Qwen2VLAdapter(CausalLMAdapter):
    """Qwen2-VL / Qwen2.5-VL: image features merge into the prompt, positions are 3-D."""

    position_rows = 3
    supports_images = True

    def __init__(self, model: torch.nn.Module, *, own_forward: bool = True) -> None:
        super().__init__(model, own_forward=own_forward)
        self.config = model.config
        self.image_token_id = self.config.image_token_id
        self.spatial_merge_size = self.config.vision_config.spatial_merge_size
        # one-frame pixel rows (vl/qwen2_vl_pixels.py) go to the tower as they are where its
        # patch embedding is the linear form, else widened first (see engine/patch_embed.py)
        self._embeds_one_frame = use_linear_patch_embed(model.model.visual)
        vision = self.config.vision_config
        self._in_channels = int(getattr(vision, "in_channels", None) or getattr(vision, "in_chans", 3))
        self._temporal_patch_size = int(vision.temporal_patch_size)
        self._frame_width = self._in_channels * int(vision.patch_size) ** 2

    def embed_prompt(self, prompt: EnginePrompt, device: torch.device) -> torch.Tensor:
        ids = torch.tensor(prompt.token_ids, dtype=torch.long, device=device)
        embeds = self.embed_tokens(ids)
        if not prompt.images:
            return embeds
        mask = ids == self.image_token_id
        features = torch.cat([img.embeddings for img in prompt.images]).to(device, embeds.dtype)
        if int(mask.sum()) != features.shape[0]:
            raise RequestRejected(
                f"Prompt has {int(mask.sum())} image tokens but the images need {features.shape[0]}.",
                kind="image_token_mismatch",
                subject="images",
            )
        embeds = embeds.clone()
        embeds[mask] = features
        return embeds

    def embed_prompt_range(self, prompt: EnginePrompt, start: int, end: int, device: torch.device) -> torch.Tensor:
        ids = torch.tensor(prompt.token_ids, dtype=torch.long, device=device)
        embeds = self.embed_tokens(ids[start:end])
        if not prompt.images:
            return embeds
        mask = ids == self.image_token_id
        features = torch.cat([img.embeddings for img in prompt.images])
        if int(mask.sum()) != features.shape[0]:
            raise RequestRejected(
                f"Prompt has {int(mask.sum())} image tokens but the images need {features.shape[0]}.",
                kind="image_token_mismatch",
                subject="images",
            )
        chunk_mask = mask[start:end]
        count = int(chunk_mask.sum())
        if count:
            first = int(mask[:start].sum())  # image tokens before the chunk
            embeds = embeds.clone()
            embeds[chunk_mask] = features[first : first + count].to(device, embeds.dtype)
        return embeds

    def prompt_positions(self, prompt: EnginePrompt, device: torch.device) -> tuple[torch.Tensor, int]:
        if not prompt.images:
            return super().prompt_positions(prompt, device)
        ids = torch.tensor([prompt.token_ids], dtype=torch.long, device=device)
        token_types = (ids == self.image_token_id).int()
        grid = torch.tensor([img.grid_thw for img in prompt.images], dtype=torch.long, device=device)
        positions, deltas = self.model.model.get_rope_index(ids, token_types, image_grid_thw=grid)
        return positions[:, 0, :], int(deltas.view(-1)[0])

    def _position_arguments(self, positions: torch.Tensor) -> dict:
        """The model forward's arguments for the padded M-RoPE positions [3, B, q]."""
        return {"input_ids": None, "position_ids": positions}

    def tokens_per_image(self, grid_thw: tuple[int, int, int]) -> int:
        t, h, w = grid_thw
        return t * h * w // (self.spatial_merge_size**2)

    def encode_images(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[ImageFeatures]:
        """Run the vision tower once over several images; one ``ImageFeatures`` per image.
        ``pixel_values`` rows are whole patches or one frame of a still image
        (``engine/patch_embed.py``)."""
        visual = self.model.model.visual
        if not self._embeds_one_frame and self._temporal_patch_size > 1 and pixel_values.shape[-1] == self._frame_width:
            pixel_values = repeat_frame(pixel_values, self._in_channels, self._temporal_patch_size)
        weight = next(visual.parameters())
        grid = torch.tensor(grids, dtype=torch.long, device=weight.device)
        out = visual(pixel_values.to(device=weight.device, dtype=weight.dtype), grid_thw=grid)
        merged = out.pooler_output if hasattr(out, "pooler_output") else out
        sizes = [self.tokens_per_image(g) for g in grids]
        return [
            ImageFeatures(embeddings=chunk.clone(), grid_thw=tuple(g))  # own storage, not a view
            for chunk, g in zip(torch.split(merged, sizes), grids, strict=True)
        ]


def adapter_for(model: torch.nn.Module, *, own_forward: bool = True) -> CausalLMAdapter:
    """The adapter of ``model``'s family; ``own_forward=False`` keeps transformers' forward
    even where ``engine.decoder_forward`` covers the model (to compare the two)."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in VL_MODEL_TYPES:
        return Qwen2VLAdapter(model, own_forward=own_forward)
    return CausalLMAdapter(model, own_forward=own_forward)
