"""The engine in a worker process: same outputs as in a thread, aborts reach the worker,
a dead worker fails its requests instead of hanging them, and the worker never outlives
the engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from engine.async_engine import open_engine
from engine.config import EngineConfig
from engine.errors import ModelLoadError, RequestRejected
from engine.malloc_tunables import WORKER_MALLOC_TUNABLES, merged_tunables
from engine.sampling_params import SamplingParams
from engine.worker_core import WorkerCore, worker_engine_config, worker_environment
from tests.engine.configs import in_thread, in_worker
from tests.engine.prompts import chat_prompt, noise_image
from tests.engine.streams import run_stream, wait_until_idle

REPO = Path(__file__).resolve().parents[2]


async def run_all(engine, requests):
    results = {}

    async def one(key, prompt, params):
        results[key] = await run_stream(engine, prompt, params)

    async with trio.open_nursery() as nursery:
        for key, (prompt, params) in requests.items():
            nursery.start_soon(one, key, prompt, params)
    return {
        key: (
            "".join(d.text for d in deltas),
            [t for d in deltas for t in d.token_ids],
            deltas[-1].finish_reason,
        )
        for key, deltas in results.items()
    }


def mixed_requests(tiny_model):
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    requests = {
        f"text-{i}": (
            chat_prompt(tiny_model, " ".join(["word"] * (3 + 5 * i)))[0],
            greedy,
        )
        for i in range(5)
    }
    requests["image"] = (
        chat_prompt(tiny_model, "describe", noise_image(1, 64, 96))[0],
        greedy,
    )
    requests["seeded"] = (
        chat_prompt(tiny_model, "tell a story")[0],
        SamplingParams(max_tokens=24, temperature=1.0, seed=11, top_p=0.9, ignore_eos=True),
    )
    requests["stop"] = (
        chat_prompt(tiny_model, "one two")[0],
        SamplingParams(max_tokens=24, temperature=0, stop_token_ids=(5,)),
    )
    return requests


async def test_outputs_match_the_in_thread_engine(tiny_model):
    """Greedy, seeded and image requests run together give the same token ids, text and
    finish reasons in the worker process as in the in-thread engine."""
    requests = mixed_requests(tiny_model)
    async with open_engine(tiny_model, in_worker(decode_steps_per_call=4)) as engine:
        in_process = await run_all(engine, requests)
        await wait_until_idle(engine, timeout=10)
        stats = engine.statistics()
    async with open_engine(tiny_model, in_thread(decode_steps_per_call=4)) as engine:
        threaded = await run_all(engine, requests)
    assert in_process == threaded
    assert all(finish in ("length", "stop") for _, _, finish in in_process.values())
    assert stats.generation_tokens == sum(len(ids) for _, ids, _ in in_process.values())
    assert stats.running == 0 and stats.cache_tokens == 0


async def test_refuses_what_the_in_thread_engine_refuses(tiny_model):
    """Also: the worker runs at the niceness it was given, above the front end's."""
    prompt, _ = chat_prompt(tiny_model, "hello")
    async with open_engine(tiny_model, in_worker(nice=3)) as engine:
        own = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, engine.core.pid) == min(own + 3, 19)
        assert engine.max_model_len == tiny_model.max_model_len
        with pytest.raises(RequestRejected) as info:
            async with engine.open_stream(prompt, SamplingParams(max_tokens=tiny_model.max_model_len)):
                pass
        assert (info.value.kind, info.value.subject) == (
            "context_length_exceeded",
            "max_tokens",
        )
        # the engine still serves after a refusal
        deltas = await run_stream(engine, prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        assert deltas[-1].completion_tokens == 3


async def test_leaving_or_cancelling_a_stream_aborts_it_in_the_worker(tiny_model):
    """Invariant: a consumer that leaves mid-generation, and one whose task is cancelled,
    both abort their sequence in the worker: afterwards the worker reports no running or
    waiting sequence and an empty cache, and a concurrent request completes normally."""
    prompt, _ = chat_prompt(tiny_model, "hello world")
    endless = SamplingParams(max_tokens=3000, ignore_eos=True)
    async with open_engine(tiny_model, in_worker(decode_steps_per_call=4)) as engine:
        results = {}
        async with trio.open_nursery() as nursery:

            async def bystander():
                results["other"] = await run_stream(
                    engine,
                    prompt,
                    SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                )

            async def cancelled_consumer(task_status=trio.TASK_STATUS_IGNORED):
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    await run_stream(engine, prompt, endless)

            nursery.start_soon(bystander)
            scope = await nursery.start(cancelled_consumer)
            async with engine.open_stream(prompt, endless) as stream:
                seen = 0
                async for delta in stream:
                    seen += len(delta.token_ids)
                    if seen >= 2:
                        break
            scope.cancel()
        await wait_until_idle(engine, timeout=10)
        assert results["other"][-1].finish_reason == "length"
        assert results["other"][-1].completion_tokens == 40
        assert engine.is_healthy()


async def test_a_dead_worker_fails_open_streams_and_health(tiny_model):
    """If the worker dies, every open stream ends with ``abort`` and an error instead of
    hanging, ``is_healthy()`` turns false, and new requests are refused."""
    prompt, _ = chat_prompt(tiny_model, "hello")
    async with open_engine(tiny_model, in_worker()) as engine:
        assert engine.is_healthy()
        async with engine.open_stream(prompt, SamplingParams(max_tokens=3000, ignore_eos=True)) as stream:
            first = await stream.__anext__()
            assert first.token_ids
            os.kill(engine.core.pid, signal.SIGKILL)
            with trio.fail_after(10):
                rest = [delta async for delta in stream]
            assert rest[-1].finish_reason == "abort"
            assert "worker" in stream.error
        assert not engine.is_healthy()
        with pytest.raises(RuntimeError):
            async with engine.open_stream(prompt, SamplingParams(max_tokens=3)):
                pass
    assert engine.core.exit_status == -signal.SIGKILL


async def test_leaving_the_engine_aborts_streams_and_reaps_the_worker(tiny_model):
    """Closing the engine while a request streams ends that stream with ``abort`` and
    waits for the worker process to exit on its own (status 0)."""
    prompt, _ = chat_prompt(tiny_model, "hello")
    async with trio.open_nursery() as nursery:
        finished = trio.Event()
        outcome = {}
        async with open_engine(tiny_model, in_worker()) as engine:

            async def consumer(task_status=trio.TASK_STATUS_IGNORED):
                async with engine.open_stream(prompt, SamplingParams(max_tokens=3000, ignore_eos=True)) as stream:
                    deltas = [await stream.__anext__()]  # the worker is generating
                    task_status.started()
                    outcome["deltas"] = deltas + [delta async for delta in stream]
                finished.set()

            await nursery.start(consumer)
        with trio.fail_after(5):
            await finished.wait()
    assert outcome["deltas"][-1].finish_reason == "abort"
    assert engine.core.exit_status == 0


async def test_an_unloadable_model_is_a_model_load_error(tiny_model, tmp_path):
    with pytest.raises(ModelLoadError, match="could not load"):
        async with WorkerCore.start(str(tmp_path / "missing"), in_worker()):
            pass


def process_environment(pid: int) -> dict[str, str]:
    """The environment a running process was started with (``/proc/PID/environ``). glibc
    2.36 parses ``GLIBC_TUNABLES`` in place, so there it reads only up to its first ``:``."""
    with open(f"/proc/{pid}/environ", "rb") as environ:
        items = [item.decode().partition("=") for item in environ.read().split(b"\0") if item]
    return {name: value for name, _, value in items}


@pytest.mark.parametrize(
    ("environment", "configured", "expected"),
    [
        ({}, WORKER_MALLOC_TUNABLES, {"GLIBC_TUNABLES": WORKER_MALLOC_TUNABLES, "OMP_WAIT_POLICY": "PASSIVE"}),
        ({}, "", {"GLIBC_TUNABLES": None, "OMP_WAIT_POLICY": "PASSIVE"}),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4", "OMP_WAIT_POLICY": "ACTIVE"},
            "glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=8",
            {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.malloc.trim_threshold=8", "OMP_WAIT_POLICY": "ACTIVE"},
        ),
    ],
)
def test_the_worker_environment_adds_malloc_tunables_and_passive_openmp(environment, configured, expected):
    """``GLIBC_TUNABLES``: the environment's own, then the configured ones it does not set
    ('' adds none); OpenMP threads wait passively unless the environment says otherwise."""
    base = {"PATH": "/bin", **environment}
    env = worker_environment(base, in_worker(malloc_tunables=configured))
    assert {name: env.get(name) for name in expected} == expected
    assert env["PATH"] == "/bin"


async def test_the_worker_process_starts_with_that_environment(tiny_model_dir):
    async with WorkerCore.start(str(tiny_model_dir), in_worker()) as core:
        worker = process_environment(core.pid)
    assert worker["OMP_WAIT_POLICY"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    expected = merged_tunables(os.environ.get("GLIBC_TUNABLES", ""), WORKER_MALLOC_TUNABLES)
    # glibc 2.36 leaves only the first item there; a glibc that parses a copy, all of them
    assert worker["GLIBC_TUNABLES"] in (expected, expected.split(":")[0])


@pytest.mark.parametrize(("configured", "heap_keeps_it"), [(WORKER_MALLOC_TUNABLES, True), ("", False)])
def test_the_default_tunables_keep_a_freed_25_mib_block_in_the_heap(monkeypatch, configured, heap_keeps_it):
    """What the tunables are for: a real-size image's 25 MiB of pixels comes from the heap
    and stays there when freed, ready for the next step; glibc's own defaults mmap it (and
    the next one is refaulted page by page)."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    env = worker_environment(os.environ, in_worker(malloc_tunables=configured))
    out = subprocess.run(
        [sys.executable, "-m", "tests.helpers.freed_block"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    mmapped_mib, trimmed_mib = map(int, out.stdout.split())
    assert (mmapped_mib, trimmed_mib) == ((0, 0) if heap_keeps_it else (25, 0))


def test_a_worker_config_gives_large_images_one_thread_beside_the_ahead_thread_else_every_cpu(tiny_model):
    """The ahead thread only in the worker process and on a CPU; beside it, large images'
    forwards on one thread."""
    assert in_worker().encodes_ahead("cpu") and not in_worker().encodes_ahead("cuda")
    assert not in_worker(vision_ahead=False).encodes_ahead("cpu")
    assert not EngineConfig(in_worker_process=False).encodes_ahead("cpu")
    assert worker_engine_config(tiny_model, in_worker()).encoder_threads == 1
    resolved = worker_engine_config(tiny_model, in_worker(vision_ahead=False))
    assert resolved.encoder_threads == (os.cpu_count() or 1)
    assert worker_engine_config(tiny_model, in_worker(encoder_threads=3)).encoder_threads == 3
    with pytest.raises(ValueError, match="encoder_threads"):
        in_worker(encoder_threads=-1)
