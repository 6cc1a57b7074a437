"""The fast Qwen2-VL preprocessing (``vl.qwen2_vl_pixels``) gives the Hugging Face
processor's output bit for bit, each patch's frame once: same grid, and the same float32
values once the frame is repeated over the temporal patch as the processor repeats it
(``engine.patch_embed.repeat_frame``), for images of many shapes, under the tiny model's
settings and Qwen2-VL's default ``max_pixels``."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from engine.errors import ModelLoadError
from engine.patch_embed import repeat_frame
from vl.image_pixels import ImagePreprocessor, load_image_preprocessor
from vl.pixel_budget import processor_bounds
from vl.qwen2_vl_pixels import PROCESSOR_DEFAULTS, PixelSettings, fast_pixels_for, fitted_size

SIZES = [(1024, 1024), (640, 480), (300, 700), (57, 33), (1000, 280), (29, 29), (2000, 1500)]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A noisy gradient: every byte value occurs, smooth and sharp regions alike."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], axis=-1)
    noisy = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy, "RGB")


def as_processor_rows(pixel_values: np.ndarray, processor) -> torch.Tensor:
    """One-frame rows (the fast path's NumPy array) in the processor's layout; they must
    be exactly one frame wide."""
    assert isinstance(pixel_values, np.ndarray)
    frame_width = 3 * processor.patch_size**2
    assert pixel_values.shape[1] == frame_width
    return repeat_frame(torch.from_numpy(pixel_values), in_channels=3, temporal=processor.temporal_patch_size)


@pytest.fixture(scope="module")
def processors(tiny_model_dir, real_size_tiny_model_dir):
    return [AutoImageProcessor.from_pretrained(d) for d in (tiny_model_dir, real_size_tiny_model_dir)]


@pytest.mark.parametrize("size", SIZES)
def test_equal_to_the_processor_bit_for_bit(processors, size):
    for processor in processors:
        fast = fast_pixels_for(processor)
        assert fast is not None, type(processor).__name__
        image = photo(*size)
        expected = processor(images=[image], return_tensors="pt")
        pixel_values, grid = fast(image)
        assert grid == tuple(int(v) for v in expected["image_grid_thw"][0])
        assert pixel_values.dtype == np.float32 and expected["pixel_values"].dtype == torch.float32
        assert torch.equal(as_processor_rows(pixel_values, processor), expected["pixel_values"])


def test_pixel_bounds_given_per_call_match_the_processors_size_argument(processors):
    processor = processors[1]
    fast = fast_pixels_for(processor)
    image = photo(1600, 900, seed=3)
    bounds = {"shortest_edge": 56 * 56, "longest_edge": 64 * 28 * 28}
    expected = processor(images=[image], size=bounds, return_tensors="pt")
    pixel_values, grid = fast(image, min_pixels=bounds["shortest_edge"], max_pixels=bounds["longest_edge"])
    assert grid == tuple(int(v) for v in expected["image_grid_thw"][0])
    assert torch.equal(as_processor_rows(pixel_values, processor), expected["pixel_values"])


def test_the_preprocessor_takes_the_fast_path_and_keeps_its_output(processors):
    processor = processors[0]
    preprocessor = ImagePreprocessor(processor, merge_size=2)
    assert preprocessor._fast is not None and preprocessor.frames_per_patch == 1
    image = photo(800, 600, seed=5)
    inputs = preprocessor(image)
    expected = processor(images=[image], return_tensors="pt")
    assert torch.equal(as_processor_rows(inputs.pixel_values, processor), expected["pixel_values"])


def test_the_fast_path_writes_into_the_buffer_it_is_given(processors):
    """With ``out``, the values land in the array ``out(shape)`` returned (a pixel slot's
    view, in prep), equal to the processor's; the processor's own path ignores ``out``."""
    processor = processors[0]
    image = photo(640, 480, seed=7)
    expected = processor(images=[image], return_tensors="pt")["pixel_values"]
    buffers = []

    def out(shape):
        buffers.append(np.full(shape, np.nan, dtype=np.float32))
        return buffers[-1]

    inputs = ImagePreprocessor(processor, merge_size=2)(image, out=out)
    assert len(buffers) == 1 and inputs.pixel_values is buffers[0]
    assert torch.equal(as_processor_rows(buffers[0], processor), expected)

    slow = ImagePreprocessor(processor, merge_size=2)
    slow._fast = None
    assert slow.frames_per_patch == 2
    inputs = slow(image, out=out)
    assert len(buffers) == 1 and torch.equal(inputs.pixel_values, expected)


def test_other_processors_are_left_to_run_as_they_are():
    class SomeOtherProcessor:
        do_resize = do_rescale = do_normalize = True

    assert fast_pixels_for(SomeOtherProcessor()) is None


@pytest.mark.parametrize("bounds", [(56 * 56, 28 * 28 * 1280), (3136, 200_704), (100_000, 120_000)])
def test_fitted_size_is_the_processors_smart_resize(bounds):
    """``fitted_size`` (written here so prep processes need not import transformers' image
    processing) gives what transformers' ``smart_resize`` gives, errors included."""
    low, high = bounds
    sides = [1, 13, 14, 27, 28, 29, 41, 42, 55, 56, 99, 300, 447, 448, 449, 640, 1023, 1024, 1035, 1036, 2000, 5001]
    for height in sides:
        for width in sides:
            try:
                expected = smart_resize(height, width, factor=28, min_pixels=low, max_pixels=high)
            except ValueError:
                with pytest.raises(ValueError, match="aspect ratio"):
                    fitted_size(height, width, factor=28, min_pixels=low, max_pixels=high)
                continue
            assert fitted_size(height, width, factor=28, min_pixels=low, max_pixels=high) == expected


def test_a_preprocessor_built_from_settings_equals_the_processors(processors):
    """The settings a server sends its prep processes (picklable) build a preprocessor
    that needs no processor and gives the same pixels, grid, token pixels and slot size."""
    for processor in processors:
        settings = pickle.loads(pickle.dumps(PixelSettings.of(processor)))
        assert settings == PixelSettings.of(processor) and hash(settings) == hash(PixelSettings.of(processor))
        full = ImagePreprocessor(processor, merge_size=2)
        light = ImagePreprocessor.from_settings(settings, merge_size=2)
        assert light.image_processor is None and light.pixel_settings == full.pixel_settings == settings
        assert light.token_pixels == full.token_pixels == 28 * 28
        assert light.max_pixel_values_bytes == full.max_pixel_values_bytes
        assert light.largest_pixel_values_bytes(50_176) == full.largest_pixel_values_bytes(50_176)
        for size in SIZES[:4]:
            image = photo(*size, seed=11)
            got, expected = light(image), full(image)
            assert got.grid_thw == expected.grid_thw and np.array_equal(got.pixel_values, expected.pixel_values)


def test_other_processors_have_no_fast_path_settings():
    class SomeOtherProcessor:
        do_resize = do_rescale = do_normalize = True

    assert PixelSettings.of(SomeOtherProcessor()) is None


def test_a_preprocessor_needs_a_processor_or_its_settings():
    with pytest.raises(ValueError, match="PixelSettings"):
        ImagePreprocessor(None, merge_size=2)


# preprocessor_config.json variants: what the file sets beside its type; each is loaded by
# AutoImageProcessor and read by PixelSettings.read, and the two must agree
CONFIG_VARIANTS = {
    "defaults only": {},
    "size only": {"size": {"shortest_edge": 4 * 28 * 28, "longest_edge": 300 * 28 * 28}},
    "min/max pixels only": {"min_pixels": 3136, "max_pixels": 12845056},
    "min/max pixels beside size": {
        "min_pixels": 56 * 56,
        "max_pixels": 100 * 28 * 28,
        "size": {"shortest_edge": 1, "longest_edge": 2},
    },
    "own values": {
        "image_mean": [0.5, 0.25, 0.125],
        "image_std": [0.3, 0.2, 0.1],
        "rescale_factor": 1 / 127.5,
        "resample": 2,
        "patch_size": 16,
        "merge_size": 3,
    },
    "one mean and std": {"image_mean": 0.5, "image_std": 0.5},
    "fast type": {"image_processor_type": "Qwen2VLImageProcessorFast"},
}


def write_preprocessor_config(directory, extra: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config = {"image_processor_type": "Qwen2VLImageProcessor", **extra}
    (directory / "preprocessor_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("variant", CONFIG_VARIANTS)
def test_settings_read_from_the_directory_equal_the_loaded_processors(tmp_path, variant):
    """A front end reads the settings from preprocessor_config.json without loading the
    processor; they equal ``of`` of the processor AutoImageProcessor loads from the same
    file (defaults, bounds from ``size`` or ``min_pixels``/``max_pixels``, the value table
    bit for bit)."""
    write_preprocessor_config(tmp_path, CONFIG_VARIANTS[variant])
    loaded = PixelSettings.of(AutoImageProcessor.from_pretrained(tmp_path))
    assert loaded is not None
    assert PixelSettings.read(tmp_path) == loaded


def test_settings_read_from_the_served_models_equal_their_processors(
    processors, tiny_model_dir, real_size_tiny_model_dir
):
    for directory, processor in zip((tiny_model_dir, real_size_tiny_model_dir), processors, strict=True):
        assert PixelSettings.read(directory) == PixelSettings.of(processor)


def test_the_read_defaults_are_the_processor_classes():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    for name, value in PROCESSOR_DEFAULTS.items():
        assert getattr(Qwen2VLImageProcessorPil, name) == pytest.approx(value), name


@pytest.mark.parametrize(
    "config",
    [
        {"image_processor_type": "SiglipImageProcessor"},
        {"image_processor_type": "Qwen2VLImageProcessor", "do_normalize": False},
        {"image_processor_type": "Qwen2VLImageProcessor", "size": {"height": 448, "width": 448}},
        {"image_processor_type": "Qwen2VLImageProcessor", "image_mean": [0.5, 0.5]},
        None,
    ],
)
def test_settings_are_not_read_where_the_fast_path_would_not_be_the_processor(tmp_path, config):
    """Another processor type, a step the fast path does not skip, bounds it does not
    know, or no readable file: ``None`` (the processor is then loaded and run as it is)."""
    if config is None:
        (tmp_path / "preprocessor_config.json").write_text("{not json")
    else:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    assert PixelSettings.read(tmp_path) is None


def test_a_model_directory_gives_the_fast_path_without_the_processor(tiny_model_dir, processors):
    """``load_image_preprocessor`` builds the fast path from the directory's file (no
    processor loaded) with the processor's pixels; a directory whose settings cannot be
    read gets its processor loaded."""
    preprocessor = load_image_preprocessor(tiny_model_dir, merge_size=2)
    assert preprocessor.image_processor is None
    assert preprocessor.pixel_settings == PixelSettings.of(processors[0])
    image = photo(300, 200, seed=3)
    expected = ImagePreprocessor(processors[0], merge_size=2)(image)
    got = preprocessor(image)
    assert got.grid_thw == expected.grid_thw and np.array_equal(got.pixel_values, expected.pixel_values)


def test_a_directory_with_settings_the_fast_path_lacks_loads_its_processor(tmp_path):
    write_preprocessor_config(tmp_path, {"do_normalize": False})
    preprocessor = load_image_preprocessor(tmp_path, merge_size=2)
    assert preprocessor.pixel_settings is None
    assert type(preprocessor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert preprocessor.pixel_bounds == processor_bounds(preprocessor.image_processor)


def test_a_directory_without_a_processor_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_image_preprocessor(tmp_path, merge_size=2)
