"""Model loading by stage (``server.load_progress``) and the warm-up before readiness: log
lines off a terminal, one rewritten line on a terminal; the real tiny model reports its
stages in order and ``/ready`` answers 503 until its warm-up sequence has run."""

from __future__ import annotations

import dataclasses
import io
import logging
from functools import partial

import httpx
import trio

import server.runtime as runtime_module
from engine.config import EngineConfig
from server.config import ServerConfig
from server.lifecycle import Phase
from server.load_progress import STAGES, LoadProgress
from server.runtime import open_runtime
from server.serve import run_server
from vl.prep_config import PrepConfig


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_each_stage_is_an_info_line(caplog):
    clock = FakeClock()
    stream = io.StringIO()
    progress = LoadProgress(stream, clock)
    with caplog.at_level(logging.INFO, logger="vlserve.load"):
        for seconds, stage in enumerate(STAGES):
            clock.now = float(seconds)
            progress.stage(stage, "engine worker process" if stage == "weights" else "")
        progress.done()
    lines = [r.getMessage() for r in caplog.records if r.name == "vlserve.load"]
    assert lines == [
        "loading model: [1/4] tokenizer after 0.0 s",
        "loading model: [2/4] processor after 1.0 s",
        "loading model: [3/4] weights (engine worker process) after 2.0 s",
        "loading model: [4/4] warm-up after 3.0 s",
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "vlserve.load")
    assert stream.getvalue() == ""


def test_on_a_terminal_one_line_is_rewritten_and_ended(caplog):
    clock = FakeClock()
    stream = TtyStream()
    progress = LoadProgress(stream, clock)
    with caplog.at_level(logging.INFO, logger="vlserve.load"):
        progress.stage("tokenizer")
        clock.now = 2.5
        progress.stage("warm-up")
        clock.now = 3.0
        progress.done()
    assert not [r for r in caplog.records if r.name == "vlserve.load"]  # DEBUG only
    assert stream.getvalue() == (
        "\r\x1b[Kloading model: [1/4] tokenizer ... 0.0 s"
        "\r\x1b[Kloading model: [4/4] warm-up ... 2.5 s"
        "\r\x1b[Kloading model: ready in 3.0 s\n"
    )


class Recorder(LoadProgress):
    def __init__(self) -> None:
        super().__init__(io.StringIO())
        self.finished = False

    def done(self) -> None:
        self.finished = True


async def test_the_tiny_model_loads_stage_by_stage_then_warms_up(tiny_model_dir):
    """From its directory: tokenizer, processor, weights (this process: the engine runs in
    a thread here), warm-up; the runtime is yielded after the warm-up's one token."""
    config = ServerConfig(
        model=str(tiny_model_dir), engine=EngineConfig(in_worker_process=False), prep=PrepConfig(processes=False)
    )
    progress = Recorder()
    async with open_runtime(config, progress=progress) as runtime:
        assert progress.stages == ["tokenizer", "processor", "weights", "warm-up"] and progress.finished
        stats = runtime.engine.statistics()
        assert stats.steps >= 1 and stats.generation_tokens == 1


async def test_ready_is_503_until_the_warm_up_has_run(vlserve_config, tiny_model, monkeypatch):
    """Invariant: while the warm-up sequence runs, ``/ready`` answers 503 (phase loading)
    and API requests are refused; once it has run, ``/ready`` answers 200."""
    warming, finish = trio.Event(), trio.Event()
    real_warm_up = runtime_module.warm_up

    async def held_warm_up(engine, loaded):
        warming.set()
        await finish.wait()
        await real_warm_up(engine, loaded)

    monkeypatch.setattr(runtime_module, "warm_up", held_warm_up)
    config = dataclasses.replace(
        vlserve_config, engine=EngineConfig(in_worker_process=False), prep=PrepConfig(processes=False)
    )
    factory = partial(open_runtime, loaded=tiny_model)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(run_server, config, runtime_factory=factory))
        with trio.fail_after(60):
            await warming.wait()
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            ready = await http.get("/ready")
            assert ready.status_code == 503 and ready.json()["phase"] == "loading"
            assert (await http.get("/v1/models")).status_code == 503
            finish.set()
            with trio.fail_after(60):
                await server.wait_ready()
            assert (await http.get("/ready")).status_code == 200
        server.shutdown()
    assert server.state.lifecycle.phase is Phase.STOPPED
