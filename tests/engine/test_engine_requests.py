"""Per-request behaviour of the engine: abort, seeds, stop strings, length, logprobs."""

from __future__ import annotations

import itertools
import math

import pytest
import trio
import trio.testing

from engine.async_engine import open_engine
from engine.sampling_params import SamplingParams
from tests.engine.configs import in_thread, in_worker
from tests.engine.prompts import chat_prompt
from tests.engine.streams import run_stream, wait_until_idle


@pytest.mark.parametrize("decode_steps_per_call", [1, 4])
async def test_leaving_a_stream_mid_generation_aborts_and_frees_cache(tiny_model, decode_steps_per_call):
    """Invariant: a consumer that leaves after two deltas aborts its sequence; once the
    next step has run the engine holds no sequences and no cache, and a concurrent
    request still completes normally."""
    prompt, _ = chat_prompt(tiny_model, "hello world")
    other, _ = chat_prompt(tiny_model, "what")
    async with open_engine(tiny_model, in_thread(decode_steps_per_call=decode_steps_per_call)) as engine:
        async with trio.open_nursery() as nursery:
            results = {}

            async def bystander():
                results["other"] = await run_stream(
                    engine,
                    other,
                    SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
                )

            nursery.start_soon(bystander)
            async with engine.open_stream(prompt, SamplingParams(max_tokens=1000, ignore_eos=True)) as stream:
                seen = 0
                async for delta in stream:
                    seen += len(delta.token_ids)
                    if seen >= 2:
                        break
            assert engine.statistics().running >= 1
        await wait_until_idle(engine)
        assert results["other"][-1].completion_tokens == 30
        assert results["other"][-1].finish_reason == "length"


@pytest.mark.parametrize("placement", [in_thread, in_worker], ids=["thread", "worker"])
async def test_cancelled_consumer_aborts_sequence(tiny_model, placement):
    """Invariant: cancelling the task that consumes a stream aborts the sequence: the
    engine goes idle (no running or waiting sequences, empty cache) long before the
    sequence could have reached its ``max_tokens``, which it would if the abort were lost."""
    prompt, _ = chat_prompt(tiny_model, "hello")
    endless = SamplingParams(max_tokens=tiny_model.max_model_len - len(prompt.token_ids), ignore_eos=True)
    async with open_engine(tiny_model, placement()) as engine:
        with trio.CancelScope() as scope:
            async with engine.open_stream(prompt, endless) as stream:
                async for delta in stream:
                    assert delta.finish_reason is None
                    scope.cancel()  # lands at the stream's next checkpoint
        assert scope.cancelled_caught
        await wait_until_idle(engine, timeout=30)
        generated = engine.statistics().generation_tokens
    assert 0 < generated < endless.max_tokens // 4


async def test_max_tokens_ends_with_length(tiny_model):
    prompt, _ = chat_prompt(tiny_model, "one two")
    async with open_engine(tiny_model, in_thread()) as engine:
        deltas = await run_stream(engine, prompt, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))
    assert sum(len(d.token_ids) for d in deltas) == 7
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].completion_tokens == 7
    assert deltas[-1].prompt_tokens == len(prompt.token_ids)


async def test_seed_reproduces_whatever_the_batch_mates(tiny_model):
    """The same seed gives the same tokens alone and inside a busy batch whose other rows
    use filters (top-p, top-k, min-p) the seeded row did not ask for."""
    prompt, _ = chat_prompt(tiny_model, "tell me about the red car")
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=42, ignore_eos=True)
    async with open_engine(tiny_model, in_thread()) as engine:
        alone = await run_stream(engine, prompt, params)
        together = {}

        async def run(key, p):
            together[key] = await run_stream(engine, prompt, p)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "seeded", params)
            for k in range(4):
                nursery.start_soon(
                    run,
                    k,
                    SamplingParams(
                        max_tokens=25,
                        temperature=0.7,
                        top_p=0.5,
                        top_k=20,
                        min_p=0.05,
                        ignore_eos=True,
                    ),
                )
        other_seed = await run_stream(
            engine,
            prompt,
            SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True),
        )

    def ids(deltas):
        return [t for d in deltas for t in d.token_ids]

    assert ids(alone) == ids(together["seeded"])
    assert ids(other_seed) != ids(alone)


async def test_stop_string_never_leaks_streamed_or_not(tiny_model):
    """The text stops right before the stop string; no delta ever contains it, nor does
    the concatenation of the deltas."""
    prompt, _ = chat_prompt(tiny_model, "one two three")
    async with open_engine(tiny_model, in_thread()) as engine:
        free = await run_stream(
            engine,
            prompt,
            SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
        )
        full_text = "".join(d.text for d in free)
        assert len(full_text) > 12
        stop = full_text[8:12]
        cut = full_text.index(stop)
        stopped = await run_stream(
            engine,
            prompt,
            SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=(stop,)),
        )
    text = "".join(d.text for d in stopped)
    assert text == full_text[:cut]
    assert stopped[-1].finish_reason == "stop"
    assert all(stop not in d.text for d in stopped)


async def test_logprobs_are_consistent(tiny_model):
    prompt, _ = chat_prompt(tiny_model, "hello")
    async with open_engine(tiny_model, in_thread()) as engine:
        deltas = await run_stream(
            engine,
            prompt,
            SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True),
        )
    entries = [e for d in deltas for e in d.logprobs]
    assert len(entries) == 5
    for entry in entries:
        assert entry.logprob <= 0
        assert len(entry.top) == 3
        # greedy: the sampled token is the most likely one
        assert entry.top[0].token_id == entry.token_id
        assert math.isclose(entry.top[0].logprob, entry.logprob, rel_tol=1e-5)
        assert entry.top[0].logprob >= entry.top[1].logprob >= entry.top[2].logprob


async def test_penalties_change_output(tiny_model):
    prompt, _ = chat_prompt(tiny_model, "one two")
    async with open_engine(tiny_model, in_thread()) as engine:
        plain = await run_stream(
            engine,
            prompt,
            SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
        )
        penalised = await run_stream(
            engine,
            prompt,
            SamplingParams(
                max_tokens=30,
                temperature=0,
                ignore_eos=True,
                frequency_penalty=2.0,
                repetition_penalty=1.5,
            ),
        )
    plain_ids = [t for d in plain for t in d.token_ids]
    pen_ids = [t for d in penalised for t in d.token_ids]
    assert plain_ids != pen_ids
    assert len(set(pen_ids)) >= len(set(plain_ids))


async def test_failed_forward_fails_its_sequences_and_engine_goes_on(tiny_model, monkeypatch):
    """A forward that raises ends the sequences in it with ``abort`` and an error; the
    engine keeps serving later requests and holds nothing for the failed ones."""
    prompt, _ = chat_prompt(tiny_model, "hello")
    adapter = tiny_model.adapter
    real_forward = adapter.forward
    calls = {"n": 0}

    def flaky_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device failure")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(adapter, "forward", flaky_forward)
    async with open_engine(tiny_model, in_thread()) as engine:
        async with engine.open_stream(prompt, SamplingParams(max_tokens=5, temperature=0)) as stream:
            deltas = [d async for d in stream]
            assert "simulated device failure" in stream.error
        assert deltas[-1].finish_reason == "abort"
        after = await run_stream(engine, prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        assert after[-1].finish_reason == "length"
        await wait_until_idle(engine)


async def test_stop_token_ids_end_generation_without_their_text(tiny_model):
    prompt, _ = chat_prompt(tiny_model, "one two three")
    async with open_engine(tiny_model, in_thread()) as engine:
        free = await run_stream(
            engine,
            prompt,
            SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
        )
        ids = [t for d in free for t in d.token_ids]
        stop_id = ids[5]
        first = ids.index(stop_id)
        stopped = await run_stream(
            engine,
            prompt,
            SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(stop_id,)),
        )
    got = [t for d in stopped for t in d.token_ids]
    assert got == ids[: first + 1]
    assert stopped[-1].finish_reason == "stop"
    expected_text = tiny_model.tokenizer.decode(ids[:first], skip_special_tokens=True)
    assert "".join(d.text for d in stopped) == expected_text


async def test_one_failing_prompt_does_not_fail_its_prefill_mates(tiny_model, monkeypatch):
    """A prompt whose prefill raises fails alone; prompts prefilled in the same step still
    get the output they get alone."""
    good, _ = chat_prompt(tiny_model, "hello world")
    bad, _ = chat_prompt(tiny_model, "the poisoned prompt")
    adapter = tiny_model.adapter
    real_embed = adapter.embed_prompt_range

    def embed(prompt, start, end, device):
        if prompt.token_ids == bad.token_ids:
            raise RuntimeError("cannot embed this one")
        return real_embed(prompt, start, end, device)

    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    async with open_engine(tiny_model, in_thread()) as engine:
        expected = await run_stream(engine, good, params)
        monkeypatch.setattr(adapter, "embed_prompt_range", embed)
        results = {}
        async with trio.open_nursery() as nursery:

            async def run(name, prompt):
                results[name] = await run_stream(engine, prompt, params)

            nursery.start_soon(run, "good", good)
            nursery.start_soon(run, "bad", bad)
        await wait_until_idle(engine)
    assert results["bad"][-1].finish_reason == "abort"
    assert [t for d in results["good"] for t in d.token_ids] == [t for d in expected for t in d.token_ids]


async def test_stream_interval_coalesces_tokens_but_not_the_last_delta(tiny_model):
    """With a stream interval, deltas after the first are at least that far apart (so a
    fast engine sends several tokens per delta), the text and ids are unchanged, and the
    final delta is not held back."""
    prompt, _ = chat_prompt(tiny_model, "one two")
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    async with open_engine(tiny_model, in_thread()) as engine:
        plain = await run_stream(engine, prompt, params)
    async with open_engine(tiny_model, in_thread(stream_interval=0.05)) as engine:
        times = []
        paced = []
        async with engine.open_stream(prompt, params) as stream:
            async for delta in stream:
                times.append(trio.current_time())
                paced.append(delta)
    assert [t for d in paced for t in d.token_ids] == [t for d in plain for t in d.token_ids]
    assert "".join(d.text for d in paced) == "".join(d.text for d in plain)
    assert len(paced) < len(plain)
    gaps = [b - a for a, b in itertools.pairwise(times[:-1])]
    assert all(g >= 0.045 for g in gaps)


async def test_in_thread_steps_run_under_the_shared_device_gate(tiny_model):
    """Invariant: with the step loop in threads, every step holds the device gate it
    shares with the vision encoder: while someone else holds the gate no step runs, and
    once it is free the request completes and the gate is back to full."""
    prompt, _ = chat_prompt(tiny_model, "hello")
    gate = trio.CapacityLimiter(1)
    async with open_engine(tiny_model, in_thread(), gate) as engine:
        deltas = []
        async with trio.open_nursery() as nursery:
            async with gate:  # e.g. a vision-encoder forward in progress

                async def consume():
                    deltas.extend(
                        await run_stream(
                            engine,
                            prompt,
                            SamplingParams(max_tokens=3, ignore_eos=True),
                        )
                    )

                nursery.start_soon(consume)
                await trio.testing.wait_all_tasks_blocked()
                assert gate.statistics().tasks_waiting == 1  # the step loop, waiting for the gate
                assert engine.statistics().steps == 0 and deltas == []
        assert deltas[-1].completion_tokens == 3
        await wait_until_idle(engine)  # the finished row leaves in one more step
        assert gate.borrowed_tokens == 0
        assert engine.statistics().device_gate_borrowed == 0
