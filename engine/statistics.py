"""``EngineStatistics`` (what an engine reports about itself) and ``StepTally`` (the
counters its step loop keeps to fill them). No torch import here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.engine_core import StepReport
    from engine.model_runner import ModelRunner
    from engine.scheduler import Scheduler


@dataclass(frozen=True)
class EngineStatistics:
    running: int
    waiting: int
    steps: int
    prompt_tokens: int
    generation_tokens: int
    cache_tokens: int
    cache_bytes: int
    last_step_seconds: float
    device_gate_borrowed: int


IDLE_STATISTICS = EngineStatistics(0, 0, 0, 0, 0, 0, 0, 0.0, 0)


@dataclass
class StepTally:
    """Counters fed by each step's report (by the step loop)."""

    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    last_step_seconds: float = 0.0

    def record(self, report: StepReport) -> None:
        self.steps += 1
        self.prompt_tokens += report.prefill_tokens
        self.generation_tokens += sum(len(u.token_ids) for u in report.updates)
        self.last_step_seconds = report.seconds

    def statistics(self, scheduler: Scheduler, runner: ModelRunner) -> EngineStatistics:
        return EngineStatistics(
            running=scheduler.num_running,
            waiting=scheduler.num_waiting,
            steps=self.steps,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            cache_tokens=runner.cache_tokens(),
            cache_bytes=runner.cache_bytes(),
            last_step_seconds=self.last_step_seconds,
            device_gate_borrowed=0,
        )
