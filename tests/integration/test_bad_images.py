"""Bad images get clear OpenAI-style 4xx errors, and the server keeps serving."""

from __future__ import annotations

import base64
import dataclasses
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.helpers.image_server import Route, serve_images
from tests.integration.invariants import wait_until_quiescent
from vl.media_policy import MediaPolicy


@pytest.fixture
def vlserve_config(vlserve_config):
    media = MediaPolicy(
        allow_private_media_urls=False,
        allowed_media_domains=("localhost",),
        fetch_timeout=0.5,
        max_image_bytes=200_000,
        max_image_pixels=4096 * 4096,
    )
    return dataclasses.replace(vlserve_config, media=media)


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def picture(size=(96, 96)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(size[1], size[0], 3) * 255).astype("uint8"))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims a gigantic canvas."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def data_uri(payload: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(payload).decode()


def body(model: str, url: str) -> dict:
    content = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4}


BIG_NOISE = encode(Image.fromarray((np.random.RandomState(1).rand(400, 400, 3) * 255).astype("uint8")), "PNG")


@pytest.mark.parametrize(
    "case, make_url, code",
    [
        ("not an image", lambda base: data_uri(b"hello, I am text, not a picture"), "invalid_image"),
        ("truncated jpeg", lambda base: data_uri(encode(picture(), "JPEG")[:300], "image/jpeg"), "invalid_image"),
        ("truncated png", lambda base: data_uri(encode(picture(), "PNG")[:200]), "invalid_image"),
        ("decompression bomb", lambda base: data_uri(png_bomb()), "image_too_large"),
        ("huge data uri", lambda base: data_uri(BIG_NOISE), "image_too_large"),
        ("huge download", lambda base: f"{base}/big.png", "image_too_large"),
        ("hanging image server", lambda base: f"{base}/hang.png", "media_fetch_timeout"),
        ("redirect to 127.0.0.1", lambda base: f"{base}/to-loopback.png", "media_url_forbidden"),
        (
            "loopback without allow flag",
            lambda base: f"{base.replace('localhost', '127.0.0.1')}/ok.png",
            "media_url_forbidden",
        ),
        ("unsupported scheme", lambda base: "ftp://localhost/cat.png", "unsupported_image_url_scheme"),
        ("not found", lambda base: f"{base}/missing.png", "media_fetch_failed"),
    ],
)
async def test_bad_image_is_a_clear_400_and_server_stays_healthy(http, runtime, case, make_url, code):
    routes = {
        "/ok.png": Route(body=encode(picture(), "PNG")),
        "/big.png": Route(body=BIG_NOISE),
        "/hang.png": Route(hang=True),
        "/to-loopback.png": Route(redirect_to="http://127.0.0.1:{port}/ok.png"),
        "/missing.png": Route(status=404, body=b"nope"),
    }
    async with serve_images(routes) as base:
        base = base.replace("127.0.0.1", "localhost")
        response = await http.post("/v1/chat/completions", json=body(runtime.model_name, make_url(base)))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] == code, error
        assert error["param"] == "messages[0].content[1].image_url"
        assert "Traceback" not in error["message"] and error["message"]
        # the server is healthy and serves a good image from an allowed host afterwards
        assert (await http.get("/health")).status_code == 200
        good = await http.post("/v1/chat/completions", json=body(runtime.model_name, f"{base}/ok.png"))
        assert good.status_code == 200, good.text
    await wait_until_quiescent(runtime)
