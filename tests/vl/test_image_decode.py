"""Decoding encoded images to RGB within the policy: formats, modes, and every way bytes go bad."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vl.errors import MediaError
from vl.image_pixels import decode_image
from vl.image_source import EncodedImage
from vl.media_policy import MediaPolicy

PARAM = "messages[0].content[0].image_url"
POLICY = MediaPolicy()


def encode(image: Image.Image, fmt: str, **save_args: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **save_args)
    return out.getvalue()


def raw(data: bytes) -> EncodedImage:
    return EncodedImage(payload=data, base64_encoded=False, source="http")


def as_base64(data: bytes) -> EncodedImage:
    return EncodedImage(payload=base64.b64encode(data), base64_encoded=True, source="data", media_type="image/png")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def expect_error(image: EncodedImage, policy: MediaPolicy = POLICY) -> MediaError:
    with pytest.raises(MediaError) as caught:
        decode_image(image, policy, param=PARAM)
    assert caught.value.param == PARAM
    assert caught.value.status == 400
    return caught.value


def noise(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    return Image.frombytes(mode, size, os.urandom(size[0] * size[1] * channels))


def with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    """``png`` whose IHDR claims ``width`` x ``height`` (CRC fixed): a tiny file, a huge header."""
    assert png[12:16] == b"IHDR"
    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:8] + png[8:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


# --- formats and modes ---------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [raw, as_base64], ids=["raw", "base64"])
def test_png_decodes_to_exact_rgb_pixels(wrap) -> None:
    original = noise((7, 5))
    decoded = decode_image(wrap(encode(original, "PNG")), POLICY, param=PARAM)
    assert decoded.mode == "RGB"
    assert decoded.size == (7, 5)
    assert np.array_equal(pixels(decoded), pixels(original))


def test_jpeg_decodes_to_rgb() -> None:
    original = Image.new("RGB", (32, 24), (40, 120, 200))
    decoded = decode_image(raw(encode(original, "JPEG", quality=95)), POLICY, param=PARAM)
    assert (decoded.mode, decoded.size) == ("RGB", (32, 24))
    assert np.abs(pixels(decoded).astype(int) - [40, 120, 200]).max() <= 3


def test_greyscale_becomes_three_equal_channels() -> None:
    grey = Image.frombytes("L", (4, 2), bytes([0, 30, 60, 90, 120, 150, 200, 255]))
    decoded = decode_image(raw(encode(grey, "PNG")), POLICY, param=PARAM)
    assert decoded.mode == "RGB"
    assert np.array_equal(pixels(decoded), np.repeat(pixels(grey)[..., None], 3, axis=2))


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    deep = Image.fromarray(np.array([[0, 256, 32768, 65535]], dtype=np.uint16))
    decoded = decode_image(raw(encode(deep, "PNG")), POLICY, param=PARAM)
    assert pixels(decoded)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_rgba_is_composited_onto_white() -> None:
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((1, 0), (200, 0, 0, 255))  # opaque red
    decoded = decode_image(raw(encode(rgba, "PNG")), POLICY, param=PARAM)
    assert decoded.mode == "RGB"
    assert pixels(decoded).tolist() == [[[255, 255, 255], [200, 0, 0]]]


def test_palette_with_transparency_is_composited_onto_white() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    decoded = decode_image(raw(encode(palette, "PNG", transparency=0)), POLICY, param=PARAM)
    assert pixels(decoded).tolist() == [[[255, 255, 255], [10, 200, 30]]]


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    decoded = decode_image(raw(encode(cmyk, "JPEG", quality=95)), POLICY, param=PARAM)
    assert decoded.mode == "RGB"
    red, green, blue = pixels(decoded).reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 40 and blue < 40


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (3, 3), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(raw(gif), POLICY, param=PARAM)
    assert decoded.mode == "RGB"
    assert pixels(decoded)[0, 0].tolist() == [255, 0, 0]


def test_multi_picture_jpeg_from_a_phone_decodes() -> None:
    mpo = encode(Image.new("RGB", (4, 4), (0, 250, 0)), "MPO", save_all=True, append_images=[Image.new("RGB", (4, 4))])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    decoded = decode_image(raw(mpo), POLICY, param=PARAM)
    assert decoded.mode == "RGB"
    assert np.abs(pixels(decoded).astype(int) - [0, 250, 0]).max() <= 8


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"hello, not an image", b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"\x89PNG"])
def test_not_an_image(data: bytes) -> None:
    error = expect_error(raw(data))
    assert error.code == "invalid_image"
    assert "not an image" in error.message


def test_formats_outside_the_accepted_list_are_refused() -> None:
    ppm = encode(Image.new("RGB", (2, 2)), "PPM")
    Image.open(io.BytesIO(ppm)).load()  # PIL itself reads it fine
    assert expect_error(raw(ppm)).code == "invalid_image"


def test_empty_payload() -> None:
    assert expect_error(raw(b"")).code == "invalid_image"


def test_truncated_jpeg() -> None:
    jpeg = encode(noise((64, 64)), "JPEG")
    error = expect_error(raw(jpeg[: len(jpeg) // 2]))
    assert error.code == "invalid_image"
    assert "truncated" in error.message


def test_truncated_png() -> None:
    png = encode(noise((64, 64)), "PNG")
    error = expect_error(raw(png[: len(png) // 2]))
    assert error.code == "invalid_image"
    assert "truncated" in error.message


def test_decompression_bomb_header_is_refused_by_pil_ceiling() -> None:
    """A ~70-byte PNG claiming 100000 x 100000 pixels: PIL's own check fires while opening,
    even with a policy that would allow it, and becomes ``image_too_large``."""
    max_before = Image.MAX_IMAGE_PIXELS
    bomb = with_ihdr_size(encode(Image.new("L", (1, 1)), "PNG"), 100_000, 100_000)
    error = expect_error(raw(bomb), MediaPolicy(max_image_pixels=10**12))
    assert error.code == "image_too_large"
    assert Image.MAX_IMAGE_PIXELS == max_before  # PIL's global left alone


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    """8000 x 8000 is under PIL's ceiling but over the policy. The body is a 1x1 image, so a
    full decode would fail as corrupt: getting ``image_too_large`` (with the header's size)
    proves the header check ran first."""
    lying = with_ihdr_size(encode(Image.new("RGB", (1, 1)), "PNG"), 8000, 8000)
    error = expect_error(raw(lying), MediaPolicy(max_image_pixels=1_000_000))
    assert error.code == "image_too_large"
    assert "8000x8000" in error.message


def test_pixel_limit_boundary() -> None:
    png = encode(Image.new("RGB", (10, 10)), "PNG")
    assert decode_image(raw(png), MediaPolicy(max_image_pixels=100), param=PARAM).size == (10, 10)
    assert expect_error(raw(png), MediaPolicy(max_image_pixels=99)).code == "image_too_large"


@pytest.mark.parametrize(
    "payload",
    [b"!!!!", b"iVBORw0KGgo", b"iVBO Rw0K", b"iVBORw0K\nGgo=", "iVBORw0KGgo=".encode("utf-16")],
    ids=["symbols", "bad-padding", "space", "newline", "utf16"],
)
def test_bad_base64(payload: bytes) -> None:
    image = EncodedImage(payload=payload, base64_encoded=True, source="data")
    error = expect_error(image)
    assert error.code == "invalid_base64"
    assert "base64" in error.message


def test_byte_cap_applies_after_base64_decoding() -> None:
    png = encode(noise((8, 8)), "PNG")
    assert decode_image(as_base64(png), MediaPolicy(max_image_bytes=len(png)), param=PARAM).size == (8, 8)
    assert expect_error(as_base64(png), MediaPolicy(max_image_bytes=len(png) - 1)).code == "image_too_large"
    assert expect_error(raw(png), MediaPolicy(max_image_bytes=len(png) - 1)).code == "image_too_large"


def test_result_is_independent_of_the_input_buffer() -> None:
    data = bytearray(encode(noise((4, 4)), "PNG"))
    decoded = decode_image(raw(bytes(data)), POLICY, param=PARAM)
    before = pixels(decoded).copy()
    data[:] = b"\0" * len(data)
    assert np.array_equal(pixels(decoded), before)
