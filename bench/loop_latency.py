"""How long a trivial trio task waits while the engine runs a full batch (GIL sharing).

The engine's step thread holds the GIL for most of a tiny-model step (framework overhead),
so the event loop gets it back only when the interpreter's switch interval forces a
hand-over. This prints, for each switch interval and batch size, the throughput and how
late a task that sleeps 20 ms wakes up (p50/p99/max) — the wait ``/health`` would see.

    python -m bench.loop_latency [--model DIR] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import sys
import time

import trio

from engine.async_engine import open_engine
from engine.config import EngineConfig
from engine.model_loader import load_model
from engine.sampling_params import SamplingParams
from engine.tiny_model import ensure_tiny_model

PROBE_PERIOD = 0.02


async def measure(loaded, prompts, max_tokens: int) -> tuple[float, list[float]]:
    lateness: list[float] = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    async with open_engine(
        loaded,
        EngineConfig(in_worker_process=False, max_num_seqs=len(prompts), decode_steps_per_call=1, stream_interval=0.0),
    ) as engine:
        done = trio.Event()

        async def probe() -> None:
            while not done.is_set():
                start = time.perf_counter()
                await trio.sleep(PROBE_PERIOD)
                lateness.append(time.perf_counter() - start - PROBE_PERIOD)

        async def one(prompt) -> None:
            async with engine.open_stream(prompt, params) as stream:
                async for _ in stream:
                    pass

        async with trio.open_nursery() as outer:
            outer.start_soon(probe)
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for prompt in prompts:
                    nursery.start_soon(one, prompt)
            elapsed = time.perf_counter() - start
            done.set()
    return len(prompts) * max_tokens / elapsed, sorted(lateness)


def main() -> None:
    from engine.prompt import EnginePrompt

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--intervals", default="0.005,0.001")
    args = parser.parse_args()
    loaded = load_model(args.model or ensure_tiny_model())
    tok = loaded.tokenizer

    def prompt(i: int) -> EnginePrompt:
        text = tok.apply_chat_template(
            [{"role": "user", "content": f"describe the red car number {i}"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        return EnginePrompt(tok(text, add_special_tokens=False).input_ids)

    previous = sys.getswitchinterval()
    rows = []
    try:
        for interval in (float(x) for x in args.intervals.split(",")):
            sys.setswitchinterval(interval)
            for batch in (int(b) for b in args.batches.split(",")):
                tps, late = trio.run(measure, loaded, [prompt(i) for i in range(batch)], args.max_tokens)
                rows.append((interval, batch, tps, late))
    finally:
        sys.setswitchinterval(previous)
    print("| switch interval | concurrent | tok/s | wake-up lateness p50 | p99 | max |")
    print("|---:|---:|---:|---:|---:|---:|")
    for interval, batch, tps, late in rows:

        def p(q, late=late):
            return late[min(len(late) - 1, int(q * len(late)))] * 1e3

        print(
            f"| {interval * 1e3:g} ms | {batch} | {tps:,.0f} | {p(0.5):.2f} ms | {p(0.99):.2f} ms | {late[-1] * 1e3:.2f} ms |"
        )


if __name__ == "__main__":
    main()
