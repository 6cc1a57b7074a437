"""Engine scenarios of the paged KV cache, each with its feature on and off in one run
(ratios side by side):

- ``shared-prefix``: ``--requests`` (64) requests with the same ~2,000-token system prompt
  and a short question each, arriving together: mean time to first token with prefix
  caching against ``--no-prefix-caching``;
- ``long-prompt``: ``--streams`` (32) streams decoding, then one ~4,000-token prompt
  arrives: the streams' p99 inter-token latency while it is prefilled, with chunked
  prefill against ``--no-chunked-prefill``;
- ``capacity`` (deterministic counts, no timing): sequences of mixed prompt lengths that
  fit a fixed KV memory budget, in the paged pool (the engine's peak ``running``) against
  a dense cache left-padded to the longest row, admitting in arrival order (the engine
  before paging: rows x longest).

    python -m bench.paged_engine [--scenario all|shared-prefix|long-prompt|capacity] [--model DIR]

Latency figures are only meaningful on a quiet machine (bench/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio

from engine.async_engine import open_engine
from engine.config import EngineConfig
from engine.model_loader import load_model
from engine.model_runner import bytes_per_token
from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams
from engine.tiny_model import ensure_tiny_model

WORDS = "the quick brown fox jumps over a lazy dog while seven red birds sing about rain".split()


def text_of_tokens(loaded, n: int, seed: int = 0) -> list[int]:
    """Token ids of a chat prompt whose system message is about ``n`` tokens of words."""
    words = [WORDS[(seed + i * 7) % len(WORDS)] for i in range(n)]
    ids = loaded.tokenizer(" ".join(words), add_special_tokens=False).input_ids
    return ids[:n]


def chat(loaded, system_ids: list[int], question: str) -> EnginePrompt:
    tok = loaded.tokenizer
    head = tok("<|im_start|>system\n", add_special_tokens=False).input_ids
    tail = tok(
        f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    ).input_ids
    return EnginePrompt(head + system_ids + tail)


def base_config(**overrides) -> EngineConfig:
    return EngineConfig(**{"max_num_seqs": 128, "stream_interval": 0.0, "decode_steps_per_call": 1, **overrides})


async def mean_ttft(loaded, config: EngineConfig, prompts: list[EnginePrompt], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ttfts = []
    async with open_engine(loaded, config) as engine:
        # warm-up request, then let the cache go cold again for fairness: different prefix
        async with engine.open_stream(EnginePrompt(prompts[0].token_ids[-8:]), params) as stream:
            async for _ in stream:
                pass

        async def one(prompt):
            start = time.perf_counter()
            async with engine.open_stream(prompt, params) as stream:
                first = True
                async for delta in stream:
                    if first and delta.token_ids:
                        ttfts.append(time.perf_counter() - start)
                        first = False

        async with trio.open_nursery() as nursery:
            for prompt in prompts:
                nursery.start_soon(one, prompt)
        stats = engine.statistics()
    print(f"  prefix_caching={config.prefix_caching}: hits {stats.prefix_cache_hits} / {stats.prefix_cache_queries}")
    return statistics.mean(ttfts)


async def p99_itl(loaded, config: EngineConfig, streams: int, long_prompt: EnginePrompt, max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    gaps: list[float] = []
    async with open_engine(loaded, config) as engine:
        started = trio.Event()
        running = 0

        async def stream_one(i):
            nonlocal running
            prompt = chat(loaded, text_of_tokens(loaded, 40, seed=i), f"question {i}")
            async with engine.open_stream(prompt, params) as stream:
                last = None
                async for delta in stream:
                    now = time.perf_counter()
                    if last is None:
                        running += 1
                        if running == streams:
                            started.set()
                    elif started.is_set() and delta.token_ids:
                        gaps.append((now - last) / len(delta.token_ids))
                    last = now

        async def long_one():
            await started.wait()
            async with engine.open_stream(long_prompt, SamplingParams(max_tokens=4, temperature=0)) as stream:
                async for _ in stream:
                    pass

        async with trio.open_nursery() as nursery:
            for i in range(streams):
                nursery.start_soon(stream_one, i)
            nursery.start_soon(long_one)
    gaps.sort()
    return gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))]


async def peak_running(loaded, config: EngineConfig, prompts: list[EnginePrompt], max_tokens: int) -> int:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    peak = 0
    async with open_engine(loaded, config) as engine:

        async def one(prompt):
            nonlocal peak
            async with engine.open_stream(prompt, params) as stream:
                async for _ in stream:
                    peak = max(peak, engine.statistics().running)

        async with trio.open_nursery() as nursery:
            for prompt in prompts:
                nursery.start_soon(one, prompt)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the built-in tiny model)")
    parser.add_argument("--scenario", default="all", choices=["all", "shared-prefix", "long-prompt", "capacity"])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--prefix-tokens", type=int, default=2000)
    parser.add_argument("--long-tokens", type=int, default=4000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--engine-process", action="store_true", help="run the engine in its worker process")
    args = parser.parse_args()
    loaded = load_model(args.model or ensure_tiny_model())
    common = {"in_worker_process": args.engine_process}
    rows = []
    if args.scenario in ("all", "shared-prefix"):
        system = text_of_tokens(loaded, args.prefix_tokens)
        prompts = [chat(loaded, system, f"question number {i}?") for i in range(args.requests)]
        on = trio.run(mean_ttft, loaded, base_config(**common), prompts, args.max_tokens)
        off = trio.run(mean_ttft, loaded, base_config(prefix_caching=False, **common), prompts, args.max_tokens)
        rows.append(("shared prefix: mean TTFT (s)", on, off, "prefix caching", "--no-prefix-caching"))
    if args.scenario in ("all", "long-prompt"):
        long_prompt = chat(loaded, text_of_tokens(loaded, args.long_tokens, seed=3), "summarise")
        cfg = {"max_num_batched_tokens": 512, **common}
        on = trio.run(p99_itl, loaded, base_config(**cfg), args.streams, long_prompt, args.max_tokens)
        off = trio.run(
            p99_itl, loaded, base_config(chunked_prefill=False, **cfg), args.streams, long_prompt, args.max_tokens
        )
        rows.append(("long prompt: streams' p99 ITL (s)", on, off, "chunked prefill", "--no-chunked-prefill"))
    if args.scenario in ("all", "capacity"):
        lengths = [(40, 200, 900, 90, 400, 60, 1500, 120)[i % 8] for i in range(96)]
        prompts = [chat(loaded, text_of_tokens(loaded, n, seed=i), f"q{i}") for i, n in enumerate(lengths)]
        sizes = [len(p.token_ids) + args.max_tokens for p in prompts]  # arrival order
        budget_tokens = 16 * 1024
        mib = budget_tokens * bytes_per_token(loaded.adapter) / 2**20
        config = base_config(kv_cache_memory=mib, max_num_seqs=256, prefix_caching=False, **common)
        paged = trio.run(peak_running, loaded, config, prompts, args.max_tokens)
        # dense, left-padded to the longest row, admitting in arrival order (as the engine
        # before paging did): the first k rows fit while k x their longest fits
        dense = max(k for k in range(len(sizes) + 1) if k == 0 or k * max(sizes[:k]) <= budget_tokens)
        rows.append(
            (f"capacity: sequences in {budget_tokens} tokens of KV", paged, dense, "paged", "dense, left-padded")
        )
    print(f"\nmodel: {loaded.path.name}  device={loaded.device}\n")
    print("| scenario | with | value | without | value | ratio |")
    print("|---|---|---:|---|---:|---:|")
    for name, on, off, on_name, off_name in rows:
        print(f"| {name} | {on_name} | {on:.4g} | {off_name} | {off:.4g} | {on / off:.2f}× |")


if __name__ == "__main__":
    main()
