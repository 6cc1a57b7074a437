"""Engine throughput: vlserve's continuous batching against transformers' generate, one run.

Prints a Markdown table of output tokens/s at 1, 8 and 32 concurrent requests, for text
prompts and for prompts with one unique 1024x1024 image each (image preparation included:
decode, preprocessing, vision encoding), beside ``model.generate`` serving the same
requests one at a time in the same process.

    python -m bench.engine [--model DIR] [--max-tokens 64] [--requests 32]

The paged KV cache's scenarios (shared prefix, long prompt during decodes, capacity) are
in ``bench.paged_engine``.
"""

from __future__ import annotations

import argparse
import base64
import io
import time

import numpy as np
import torch
import trio
from PIL import Image

from engine.config import EngineConfig
from engine.model_loader import load_model
from engine.sampling_params import SamplingParams
from engine.tiny_model import ensure_tiny_model
from server.config import ServerConfig
from server.request_body import parse_chat
from server.runtime import open_runtime

PROMPTS = [
    "describe the red car on the road",
    "what is the color of the sky",
    "one two three four five six seven eight nine ten",
    "please answer the question about the house",
]


def natural_image(seed: int, size: int = 1024) -> Image.Image:
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, (x + y) / 2], axis=-1) * rng.uniform(80, 200, size=3)
    noise = rng.normal(0, 12, size=(size, size, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8"))


def jpeg_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def messages_for(i: int, image_uri: str | None) -> list[dict]:
    text = PROMPTS[i % len(PROMPTS)] + f" (request {i})"
    if image_uri is None:
        return [{"role": "user", "content": text}]
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image_uri}}, {"type": "text", "text": text}],
        }
    ]


async def vlserve_throughput(loaded, requests: list[list[dict]], concurrency: int, max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    produced = 0
    async with open_runtime(ServerConfig(engine=EngineConfig(max_num_seqs=max(concurrency, 1))), loaded=loaded) as rt:
        limiter = trio.CapacityLimiter(concurrency)

        async def one(messages):
            nonlocal produced
            async with limiter:
                prepared = await rt.preparer.prepare_chat(parse_chat(messages))
                try:
                    async with rt.engine.open_stream(prepared.prompt, params, prepared.lease) as stream:
                        async for delta in stream:
                            produced += len(delta.token_ids)
                finally:
                    if prepared.lease is not None:
                        prepared.lease.release_creator()

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for messages in requests:
                nursery.start_soon(one, messages)
        elapsed = time.perf_counter() - start
    return produced / elapsed


def generate_throughput(loaded, requests: list[list[dict]], max_tokens: int) -> float:
    tok, model = loaded.tokenizer, loaded.model
    produced = 0
    start = time.perf_counter()
    for messages in requests:
        content = messages[0]["content"]
        kwargs = {}
        if isinstance(content, list):
            uri = content[0]["image_url"]["url"]
            image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
            processed = loaded.image_processor(images=[image], return_tensors="pt")
            n = int(processed["image_grid_thw"].prod()) // 4
            content = [{"type": "image"}, content[1]]
            text = tok.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            text = text.replace("<|image_pad|>", "<|image_pad|>" * n)
            kwargs = {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}
        else:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
        if kwargs:
            kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                **kwargs,
            )
        produced += out.shape[1] - ids.shape[1]
    return produced / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the built-in tiny model)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement (at least the concurrency)")
    parser.add_argument("--baseline-requests", type=int, default=8, help="requests for the generate() baseline")
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args()
    loaded = load_model(args.model or ensure_tiny_model())
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    for kind in ("text", "image 1024²"):
        uris = (
            [jpeg_data_uri(natural_image(i)) for i in range(max(args.requests, max(levels)))]
            if kind != "text"
            else None
        )

        def make(n, offset=0, uris=uris):
            return [messages_for(i + offset, uris[(i + offset) % len(uris)] if uris else None) for i in range(n)]

        baseline = generate_throughput(loaded, make(args.baseline_requests), args.max_tokens)
        for c in levels:
            n = max(args.requests, c)
            tps = trio.run(vlserve_throughput, loaded, make(n, offset=1000 * c), c, args.max_tokens)
            rows.append((kind, c, tps, baseline))
    print(f"\nmodel: {loaded.path.name}  max_tokens={args.max_tokens}  ignore_eos  greedy  device={loaded.device}\n")
    print("| workload | concurrent | vlserve tok/s | generate() one-at-a-time tok/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for kind, c, tps, base in rows:
        print(f"| {kind} | {c} | {tps:,.0f} | {base:,.0f} | {tps / base:.1f}× |")


if __name__ == "__main__":
    main()
