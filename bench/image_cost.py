"""CPU time per image of each stage of vlserve's image path, on the tiny model, in one process.

On two cores an image burst is CPU-bound: the server's requests per second is about the
cores divided by the CPU milliseconds one request costs, wherever they are spent. This
prints, per image (a benchmark photo of ``--size``² pixels, JPEG, as the image workloads
send), the thread CPU time of:

- decode: ``vl.image_pixels.decode_image`` (JPEG to an RGB PIL image);
- preprocess into a new array, then copy into a pixel slot (the path before in-place writes);
- preprocess straight into the slot (``SlotMemory.array_view``, what prep does now);
- the engine's copy out of the slot (``SlotMemory.read``);
- the vision tower over ``--batch`` images at once, per image, with the patch embedding as
  the model's ``Conv3d`` over whole patches (the processor's rows: each frame twice) and as
  the engine's matrix product over one frame (``engine.patch_embed``), and the share of the
  tower's time that embedding takes.

    python -m bench.image_cost [--model DIR] [--size 1024] [--images 24] [--batch 8] [--repeats 3]

Every figure is the median over ``--repeats`` rounds of CPU time (``time.thread_time``), with
torch on one thread, so it compares stages side by side on one machine; absolute values
move with the CPU model.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.workloads.image_store import ImageStore, default_image_dir
from engine.model_loader import load_model
from engine.patch_embed import LinearPatchEmbed, repeat_frame
from engine.pixel_slots import SlotPool
from engine.tiny_model import ensure_tiny_model
from vl.image_pixels import ImagePreprocessor, decode_image, slot_bytes_for
from vl.image_source import EncodedImage
from vl.media_policy import MediaPolicy
from vl.prep_config import PrepConfig


def cpu_ms_per_item(work: Callable[[], object], items: int, repeats: int) -> float:
    """Median over ``repeats`` of the calling thread's CPU ms for ``work()``, divided by ``items``."""
    work()  # warm caches and allocator
    rounds = []
    for _ in range(repeats):
        started = time.thread_time()
        work()
        rounds.append((time.thread_time() - started) * 1000 / items)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a local Qwen2-VL directory (default: the built-in tiny model)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument("--images", type=int, default=24, help="distinct images per round (default 24)")
    parser.add_argument("--batch", type=int, default=8, help="images per vision forward (default 8)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    loaded = load_model(args.model or ensure_tiny_model())
    store = ImageStore(default_image_dir(args.size), args.size)
    store.ensure(range(args.images))
    payloads = [store.read(i) for i in range(args.images)]
    policy = MediaPolicy()
    preprocessor = ImagePreprocessor(loaded.image_processor, loaded.adapter.spatial_merge_size)

    def decode_all() -> list:
        return [
            decode_image(EncodedImage(p, base64_encoded=False, source="bench"), policy, param="x") for p in payloads
        ]

    decoded = decode_all()
    rows: list[tuple[str, float]] = [("decode (JPEG to RGB)", cpu_ms_per_item(decode_all, len(decoded), args.repeats))]
    with SlotPool.create(2, slot_bytes_for(preprocessor, PrepConfig())) as pool:
        memory = pool.memory

        def copy_into_slot() -> None:
            for image in decoded:
                memory.write(0, preprocessor(image).pixel_values)

        def in_place() -> None:
            for image in decoded:
                values = preprocessor(image, out=lambda shape: memory.array_view(0, shape)).pixel_values
                memory.write(0, values)
                del values

        rows.append(("preprocess, then copy into a slot", cpu_ms_per_item(copy_into_slot, len(decoded), args.repeats)))
        rows.append(("preprocess into the slot", cpu_ms_per_item(in_place, len(decoded), args.repeats)))
        inputs = [preprocessor(image) for image in decoded]
        described = memory.write(1, inputs[0].pixel_values)
        rows.append(("engine's copy out of the slot", cpu_ms_per_item(lambda: memory.read(described), 1, args.repeats)))

    batch = inputs[: args.batch]
    frames = torch.cat([torch.as_tensor(i.pixel_values) for i in batch])  # one frame per patch (vl/qwen2_vl_pixels.py)
    grid = torch.tensor([i.grid_thw for i in batch])
    linear_tower = loaded.adapter.model.model.visual
    conv_tower = copy.deepcopy(linear_tower)
    linear = conv_tower.patch_embed
    if isinstance(linear, LinearPatchEmbed):  # back to transformers' module, same weight
        from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed

        conv_tower.patch_embed = PatchEmbed(
            linear.patch_size, linear.temporal_patch_size, linear.in_channels, linear.embed_dim
        )
        conv_tower.patch_embed.proj = linear.proj
    whole_patches = repeat_frame(frames, linear.in_channels, linear.temporal_patch_size)
    towers = (("Conv3d, whole patches", conv_tower, whole_patches), ("matrix product, one frame", linear_tower, frames))
    with torch.inference_mode():
        for label, tower, pixel_values in towers:
            whole = cpu_ms_per_item(lambda t=tower, v=pixel_values: t(v, grid_thw=grid), len(batch), args.repeats)
            embed = cpu_ms_per_item(lambda t=tower, v=pixel_values: t.patch_embed(v), len(batch), args.repeats)
            rows.append((f"vision tower, patch embedding as {label}", whole))
            rows.append((f"  of which the patch embedding ({embed / whole:.0%})", embed))

    name = Path(args.model).name if args.model else "the tiny model"
    print(f"CPU ms per image: {name}, {args.size}² JPEG photos, vision batches of {len(batch)}, torch on 1 thread\n")
    print("| stage | CPU ms per image |\n|---|---:|")
    for label, ms in rows:
        print(f"| {label} | {ms:.2f} |")


if __name__ == "__main__":
    main()
