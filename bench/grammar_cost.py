"""What a grammar engine costs on the tiny model's tokenizer: llguidance against xgrammar.

    python -m bench.grammar_cost [--batch 32] [--steps 40]

For each library that imports here it measures, on the built-in tiny model's tokenizer
(``engine.tiny_model``) with the logits' vocabulary size:

- ``tokenizer``: building the library's tokenizer view (once per engine);
- ``compile``: compiling one small JSON schema, fresh (no cache), for each schema below,
  compact (no free whitespace);
- ``mask/step``: one decode step of a batch of ``--batch`` constrained rows: every row's
  allowed-token bitmask filled, the mask applied to the logits (``engine.grammar``'s own
  unpacking, the same for both), and one allowed token consumed per row. Rows walk random
  allowed paths (seeded), so each step sees a different grammar state.

Wall-clock numbers on a shared machine are noisy: compare orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

SCHEMAS = {
    "enum": {
        "type": "object",
        "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
        "required": ["colour"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
            },
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        },
        "required": ["name", "age", "address", "tags"],
        "additionalProperties": False,
    },
    "any_json": {"type": "object"},
}


def apply_mask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set disallowed logits to -inf (bit ``i`` of the packed int32 words allows token ``i``)."""
    vocab = logits.shape[1]
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    logits.masked_fill_(torch.from_numpy(bits == 0), float("-inf"))


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def allowed_ids(bitmask_row: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab])


def bench_llguidance(hf_tokenizer, vocab: int, eos: list[int], batch: int, steps: int) -> dict[str, str]:
    import llguidance
    import llguidance.torch as lltorch

    build, tokenizer = timed(
        lambda: llguidance.LLTokenizer(hf_tokenizer.backend_tokenizer.to_str(), n_vocab=vocab, eos_token=eos)
    )
    row = {"library": f"llguidance {llguidance.get_version() if hasattr(llguidance, 'get_version') else ''}"}
    row["tokenizer"] = f"{build * 1e3:.1f} ms"
    grammars = {}
    for name, schema in SCHEMAS.items():

        def compile_one(schema=schema):
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False}
            )
            matcher = llguidance.LLMatcher(tokenizer, grammar)
            assert not matcher.is_error(), matcher.get_error()
            return grammar

        seconds, grammars[name] = timed(compile_one)
        row[f"compile {name}"] = f"{seconds * 1e3:.2f} ms"
    rng = random.Random(0)
    matchers = [llguidance.LLMatcher(tokenizer, grammars["nested"]) for _ in range(batch)]
    bitmask = lltorch.allocate_token_bitmask(batch, vocab)
    costs = []
    for _ in range(steps):
        logits = torch.randn(batch, vocab)
        started = time.perf_counter()
        for i, m in enumerate(matchers):
            lltorch.fill_next_token_bitmask(m, bitmask, i)
        apply_mask(logits, bitmask)
        for i, m in enumerate(matchers):
            if m.is_stopped():
                m.reset()
            ids = allowed_ids(bitmask[i].numpy(), vocab)
            m.consume_token(int(rng.choice(ids)))
        costs.append(time.perf_counter() - started)
    row["mask/step"] = f"{statistics.median(costs) * 1e3:.2f} ms"
    return row


def bench_xgrammar(hf_tokenizer, vocab: int, eos: list[int], batch: int, steps: int) -> dict[str, str]:
    import xgrammar as xgr

    build, info = timed(lambda: xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab, stop_token_ids=eos))
    row = {"library": "xgrammar"}
    row["tokenizer"] = f"{build * 1e3:.1f} ms"
    compiled = {}
    for name, schema in SCHEMAS.items():
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        seconds, compiled[name] = timed(
            lambda schema=schema, compiler=compiler: compiler.compile_json_schema(
                json.dumps(schema), any_whitespace=False
            )
        )
        row[f"compile {name}"] = f"{seconds * 1e3:.2f} ms"
    rng = random.Random(0)
    matchers = [xgr.GrammarMatcher(compiled["nested"]) for _ in range(batch)]
    bitmask = xgr.allocate_token_bitmask(batch, vocab)
    costs = []
    for _ in range(steps):
        logits = torch.randn(batch, vocab)
        started = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        apply_mask(logits, bitmask)
        for i, m in enumerate(matchers):
            if m.is_terminated():
                m.reset()
            ids = allowed_ids(bitmask[i].numpy(), vocab)
            m.accept_token(int(rng.choice(ids)))
        costs.append(time.perf_counter() - started)
    row["mask/step"] = f"{statistics.median(costs) * 1e3:.2f} ms"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    from transformers import AutoConfig, AutoTokenizer

    from engine.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model()
    hf_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).text_config.vocab_size
    eos = [hf_tokenizer.convert_tokens_to_ids("<|im_end|>"), hf_tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    rows = []
    for bench in (bench_llguidance, bench_xgrammar):
        try:
            rows.append(bench(hf_tokenizer, vocab, eos, args.batch, args.steps))
        except ImportError as exc:
            rows.append({"library": f"{bench.__name__[6:]} (not installed: {exc.name})"})
    columns = ["library", "tokenizer", *(f"compile {n}" for n in SCHEMAS), "mask/step"]
    print(f"vocab {vocab}, batch {args.batch}, median of {args.steps} steps\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row.get(c, "") for c in columns) + " |")


if __name__ == "__main__":
    main()
