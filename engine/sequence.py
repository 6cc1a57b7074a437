"""One generation request as the engine sees it: prompt, parameters, output so far, status."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from engine.outputs import TokenLogprob
from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Mutable per-sequence state.

    Ownership: the scheduler (on the event loop) moves a sequence between queues and sets
    ``abort_requested``; the step thread appends outputs while it runs a step that contains
    the sequence. The two never overlap because the event loop reads outputs only after the
    step has returned.
    """

    seq_id: int
    prompt: EnginePrompt
    params: SamplingParams
    status: SequenceStatus = SequenceStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    abort_requested: bool = False
    rope_delta: int = 0
    error: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt.token_ids)

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


class SequenceIds:
    """Hands out unique sequence ids; one counter per engine (no module-level state)."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def next(self) -> int:
        return next(self._counter)
