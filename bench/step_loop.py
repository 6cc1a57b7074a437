"""The engine's step loop alone on the text workload's prompts: requests per second and CPU
milliseconds per request at a fixed concurrency, with no HTTP, no front end and no
tokenizer process: what the engine worker can do when nothing else takes its core.

    python -m bench.step_loop [--model DIR] [--concurrency 32,64] [--requests 256] [--max-tokens 32] [--repeats 3]

Prompts are the tokens of ``bench.workloads.text_prompts`` rendered by the model's chat
template (55 to 370 tokens with the tiny model), each request greedy with ``ignore_eos``;
a finished request is replaced at once (a closed loop, as the load generator runs). The
engine has the server's defaults (``EngineConfig()``) except ``max_num_seqs``, which is
the concurrency. Prefix caching is off so that repeated runs do the same work. Torch runs
on one thread, as in the engine worker on two cores. Each figure is the median of
``--repeats`` runs; compare trees side by side on one machine (``PYTHONPATH=<tree>``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from bench.workloads.text_prompts import text_prompt
from engine.config import EngineConfig
from engine.core_messages import NewSequence, Submit
from engine.model_loader import load_model
from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams
from engine.step_loop import StepLoop
from engine.tiny_model import ensure_tiny_model


def prompts_for(loaded, count: int) -> list[EnginePrompt]:
    tokenizer = loaded.tokenizer
    out = []
    for i in range(count):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text_prompt(i)}], tokenize=False, add_generation_prompt=True
        )
        out.append(EnginePrompt(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def run_once(loaded, prompts: list[EnginePrompt], concurrency: int, max_tokens: int) -> tuple[float, float, int]:
    """(seconds, thread CPU seconds, steps) to finish every prompt, ``concurrency`` at a time."""
    config = replace(EngineConfig(), max_num_seqs=concurrency, prefix_caching=False)
    loop = StepLoop.for_model(loaded, config)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    pending = iter(enumerate(prompts))

    def submit(count: int) -> int:
        taken = [item for item in (next(pending, None) for _ in range(count)) if item is not None]
        adds = [NewSequence(i, prompt, params) for i, prompt in taken]
        if adds:
            loop.accept([Submit(adds, [])])
        return len(adds)

    started, cpu_started, steps = time.perf_counter(), time.thread_time(), 0
    running = submit(concurrency)
    while running:
        outputs = loop.run_step()
        steps += 1
        finished = sum(1 for u in (outputs.updates if outputs else ()) if u.finish_reason is not None)
        running += submit(finished) - finished
    return time.perf_counter() - started, time.thread_time() - cpu_started, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a local model directory (default: the built-in tiny model)")
    parser.add_argument("--concurrency", default="32,64", help="comma-separated (default 32,64)")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(args.model or ensure_tiny_model())
    prompts = prompts_for(loaded, args.requests)
    mean_tokens = statistics.mean(len(p.token_ids) for p in prompts)
    run_once(loaded, prompts[: min(len(prompts), 16)], 16, 4)  # warm up
    print(
        f"engine step loop alone: {args.requests} requests, prompts of {mean_tokens:.0f} tokens on average, "
        f"{args.max_tokens} output tokens each, torch on 1 thread, median of {args.repeats} runs\n"
    )
    print("| concurrency | req/s | CPU ms per request | steps | runs (req/s) |\n|---:|---:|---:|---:|---|")
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        runs = [run_once(loaded, prompts, concurrency, args.max_tokens) for _ in range(args.repeats)]
        rates = [args.requests / seconds for seconds, _, _ in runs]
        cpu = statistics.median(c for _, c, _ in runs) * 1000 / args.requests
        steps = statistics.median(s for _, _, s in runs)
        each = " / ".join(f"{r:.1f}" for r in rates)
        print(f"| {concurrency} | {statistics.median(rates):.1f} | {cpu:.2f} | {steps:.0f} | {each} |")


if __name__ == "__main__":
    main()
