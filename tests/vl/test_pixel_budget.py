"""An image's pixel budget: the server's bounds (``--min-pixels``/``--max-pixels``, or the
image processor's capped to half the context), narrowed by ``detail: low`` and the
request's ``mm_processor_kwargs`` (clamped); pixel slots are sized for the server's bound."""

from __future__ import annotations

import base64
import io
import math

import pytest

from engine.config import EngineConfig
from server.config import ServerConfig
from server.runtime import open_runtime
from tests.engine.prompts import noise_image
from vl.chat_messages import Chat, ImagePart, Message, TextPart
from vl.media_policy import MediaPolicy
from vl.pixel_budget import (
    LOW_DETAIL_TOKENS,
    PixelBounds,
    PixelRequest,
    image_bounds,
    processor_bounds,
    server_bounds,
)
from vl.prep_config import PrepConfig

TOKEN = 784  # (14 x 2)² pixels per image token
SERVER = PixelBounds(3136, 200704)


def test_server_bounds_take_the_flags_else_the_model_capped_by_half_the_context():
    model = PixelBounds(3136, 12845056)  # Qwen2-VL's default: 16384 tokens
    assert server_bounds(model, token_pixels=TOKEN, max_model_len=4096) == PixelBounds(3136, 2048 * TOKEN)
    assert server_bounds(model, token_pixels=TOKEN, max_model_len=65536) == model
    flagged = server_bounds(model, token_pixels=TOKEN, max_model_len=4096, min_pixels=1000, max_pixels=10**7)
    assert flagged == PixelBounds(1000, 10**7)
    with pytest.raises(ValueError, match="above"):
        server_bounds(model, token_pixels=TOKEN, max_model_len=4096, min_pixels=5000, max_pixels=4000)


def test_detail_low_is_a_small_fixed_budget():
    low = image_bounds(SERVER, detail="low", request=None, token_pixels=TOKEN)
    assert low == PixelBounds(3136, LOW_DETAIL_TOKENS * TOKEN)
    for detail in ("auto", "high"):
        assert image_bounds(SERVER, detail=detail, request=None, token_pixels=TOKEN) == SERVER


def test_requested_bounds_are_clamped_to_the_servers():
    def bounds(low, high, detail="auto"):
        return image_bounds(SERVER, detail=detail, request=PixelRequest(low, high), token_pixels=TOKEN)

    assert bounds(None, 100_000) == PixelBounds(3136, 100_000)
    assert bounds(None, 10**9) == SERVER  # no request gets past the server's bound (the slots' size)
    assert bounds(1, 2) == PixelBounds(3136, 3136)
    assert bounds(150_000, None) == PixelBounds(150_000, 200704)
    assert bounds(150_000, 100_000) == PixelBounds(100_000, 100_000)
    assert bounds(None, 10**9, "low") == PixelBounds(3136, LOW_DETAIL_TOKENS * TOKEN)


def test_processor_bounds_read_the_tiny_models_processor(tiny_model):
    assert processor_bounds(tiny_model.image_processor) == SERVER
    assert processor_bounds(object()) is None


def data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_tokens(prompt, image_token_id: int) -> int:
    return sum(1 for t in prompt.token_ids if t == image_token_id)


async def test_detail_and_requests_shrink_a_large_image_through_the_preparer(tiny_model):
    """A 1200x900 photo: the server's bound (256 tokens) by default, at most 64 tokens with
    ``detail: low``, fewer with a smaller ``max_pixels`` request; a request for more than the
    server allows gets the server's bound. Tokens, grid and pixels in the slot agree."""
    photo = data_uri(noise_image(7, 900, 1200))
    config = ServerConfig(prep=PrepConfig(processes=False), engine=EngineConfig(in_worker_process=False))
    pad = tiny_model.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = {}
    async with open_runtime(config, loaded=tiny_model) as rt:
        assert rt.preparer.pixel_bounds == SERVER
        cases = {
            "auto": ("auto", None),
            "low": ("low", None),
            "request-50k": ("auto", PixelRequest(max_pixels=50_000)),
            "request-huge": ("high", PixelRequest(max_pixels=10**9)),
        }
        for name, (detail, request) in cases.items():
            chat = Chat((Message("user", (ImagePart(photo, detail), TextPart("what is it?"))),), pixels=request)
            prepared = await rt.preparer.prepare_chat(chat)
            try:
                (image,) = prepared.prompt.images
                t, h, w = image.grid_thw
                assert image_tokens(prepared.prompt, pad) == t * h * w // 4
                assert rt.slots.memory.read(image.pixels).shape[0] == t * h * w
                counts[name] = t * h * w // 4
            finally:
                prepared.lease.release_creator()
    assert counts["auto"] == counts["request-huge"] <= 200704 // TOKEN
    assert counts["low"] <= LOW_DETAIL_TOKENS < counts["auto"]
    assert counts["request-50k"] <= math.floor(50_000 / TOKEN) < counts["auto"]


async def test_server_max_pixels_caps_images_and_sizes_the_slots(tiny_model):
    """``--max-pixels`` above the processor's own: slots grow to hold it and a large image
    uses it; below: slots shrink and every image is capped."""
    photo = data_uri(noise_image(8, 900, 1200))
    chat = Chat((Message("user", (ImagePart(photo), TextPart("what is it?"))),))
    grids = {}
    for max_pixels in (50_176, 802_816):
        config = ServerConfig(
            media=MediaPolicy(max_pixels=max_pixels),
            prep=PrepConfig(processes=False),
            engine=EngineConfig(in_worker_process=False),
        )
        async with open_runtime(config, loaded=tiny_model) as rt:
            assert rt.preparer.pixel_bounds.max_pixels == max_pixels
            patches = max_pixels // 14**2
            assert rt.slots.spec.slot_bytes >= patches * 3 * 14**2 * 4  # one frame per patch
            prepared = await rt.preparer.prepare_chat(chat)
            (image,) = prepared.prompt.images
            grids[max_pixels] = image.grid_thw
            prepared.lease.release_creator()
    assert grids[50_176][1] * grids[50_176][2] * 14**2 <= 50_176
    assert 200_704 < grids[802_816][1] * grids[802_816][2] * 14**2 <= 802_816
