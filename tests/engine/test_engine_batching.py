"""The engine's continuous batching gives each request what it would get alone."""

from __future__ import annotations

import pytest
import trio

from engine.async_engine import open_engine
from engine.core_messages import NewSequence, Submit
from engine.sampling_params import SamplingParams
from engine.step_loop import StepLoop
from tests.engine.configs import in_thread
from tests.engine.prompts import chat_prompt, noise_image, reference_generate

TEXTS = [
    "hello world",
    "describe the cat in the picture please",
    "one two three four five six seven eight nine ten " * 4,
    "what",
    "red green blue yellow white black small large",
    "a",
    "the sun is bright and the sky is blue",
    "question: what number comes after nine?",
    "please answer the question about the old house",
]
IMAGE_SIZES = {1: (300, 400), 3: (128, 96), 4: (500, 200), 7: (224, 224)}


async def collect(engine, prompt, params, *, delay: float = 0.0):
    await trio.sleep(delay)
    ids, text, finish = [], "", None
    async with engine.open_stream(prompt, params) as stream:
        async for delta in stream:
            ids += delta.token_ids
            text += delta.text
            finish = delta.finish_reason
    return ids, text, finish


@pytest.mark.parametrize("decode_steps_per_call", [1, 4])
async def test_mixed_requests_joining_a_running_batch_match_generate_alone(tiny_model, decode_steps_per_call):
    """Invariant: greedy outputs of 9 text and image requests of different lengths, admitted
    at different moments into one running batch (rows join and leave between steps), equal
    each request's output from transformers' ``generate`` run alone."""
    requests = []
    for i, text in enumerate(TEXTS):
        image = noise_image(i, *IMAGE_SIZES[i]) if i in IMAGE_SIZES else None
        requests.append(chat_prompt(tiny_model, text, image))
    max_tokens = [12 + 3 * i for i in range(len(requests))]
    expected = [reference_generate(tiny_model, p, extra, n) for (p, extra), n in zip(requests, max_tokens, strict=True)]

    results = [None] * len(requests)
    async with open_engine(
        tiny_model, in_thread(max_num_seqs=6, decode_steps_per_call=decode_steps_per_call)
    ) as engine:

        async def run(i):
            params = SamplingParams(max_tokens=max_tokens[i], temperature=0)
            # staggered arrivals: some join while others are mid-generation
            results[i] = await collect(engine, requests[i][0], params, delay=0.01 * (i % 4))

        async with trio.open_nursery() as nursery:
            for i in range(len(requests)):
                nursery.start_soon(run, i)
        stats = engine.statistics()
    for i, (ids, _text, finish) in enumerate(results):
        assert ids == expected[i], f"request {i} differs from generate()"
        assert finish in ("length", "stop")
    assert stats.generation_tokens >= sum(len(e) for e in expected)
    assert stats.steps * decode_steps_per_call >= max(max_tokens)  # one shared, continuing batch


async def test_request_joins_while_batch_is_running(tiny_model):
    """A request submitted mid-generation starts before the running ones finish."""
    long_prompt, _ = chat_prompt(tiny_model, "hello world")
    short_prompt, _ = chat_prompt(tiny_model, "what")
    order = []
    async with open_engine(tiny_model, in_thread()) as engine:
        generating = trio.Event()

        async def long_one():
            params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
            async with engine.open_stream(long_prompt, params) as stream:
                async for _ in stream:
                    generating.set()
            order.append("long")

        async def short_one():
            await generating.wait()  # submitted while the long one is mid-generation
            await collect(engine, short_prompt, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
            order.append("short")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_one)
            nursery.start_soon(short_one)
    assert order == ["short", "long"]


def test_a_step_that_prefills_sends_its_first_tokens_without_further_decode_sub_steps(tiny_model):
    """With several decode sub-steps per call, a step that prefills a prompt ends after its
    one decode of the running rows: the newcomer's first token leaves in that step's
    outputs with nothing behind it, and each row decoding alongside advances one token.
    Steps without a prefill still run their sub-steps (the first decode-only step here
    gives four tokens). Without this the first token waited for three more decodes of
    the whole batch before it was sent."""
    loop = StepLoop.for_model(tiny_model, in_thread(decode_steps_per_call=4))
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    def step(*news: NewSequence) -> dict[int, int]:
        """Tokens each sequence got in one step (a sub-step's tokens are an update of their own)."""
        tokens: dict[int, int] = {}
        for update in loop.step(Submit(list(news)) if news else None).updates:
            tokens[update.seq_id] = tokens.get(update.seq_id, 0) + len(update.token_ids)
        return tokens

    assert step(NewSequence(0, chat_prompt(tiny_model, TEXTS[0])[0], greedy)) == {0: 1}
    assert step() == {0: 4}  # decode only: all four sub-steps
    assert step(NewSequence(1, chat_prompt(tiny_model, TEXTS[1])[0], greedy)) == {0: 1, 1: 1}
    assert step() == {0: 4, 1: 4}
