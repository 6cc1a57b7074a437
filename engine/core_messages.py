"""What the engine's front end and its step loop say to each other, wherever the loop runs
(a thread of the server process, or the engine worker process, where ``engine.wire``
frames these messages on a socket). Plain frozen values; no torch import here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.config import EngineConfig
from engine.outputs import TokenLogprob
from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams
from engine.statistics import EngineStatistics
from engine.step_timings import StepTimings

if TYPE_CHECKING:
    from engine.pixel_slots import SlotSpec


@dataclass(frozen=True, eq=False)
class NewSequence:
    """A sequence to run; its id is the front end's (``StreamRegistry``)."""

    seq_id: int
    prompt: EnginePrompt
    params: SamplingParams


@dataclass(frozen=True)
class Submit:
    """Sequences to add, then sequence ids to abort (ids the loop no longer knows are ignored)."""

    adds: list[NewSequence] = field(default_factory=list)
    aborts: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SequenceOutput:
    """New output of one sequence after a step: the one update type from the step loop to
    the sequence's ``RequestStream``. ``finish_reason`` is set on the last one only;
    ``error`` says why the engine ended the sequence (``finish_reason`` ``"abort"``)."""

    seq_id: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    error: str | None = None


@dataclass(frozen=True)
class StepOutputs:
    """Sent after every step, and whenever the loop goes idle, so statistics stay current.
    ``pixels_read``: sequences whose images' pixel slots the step loop no longer reads (each
    image encoded, failed or dropped, or the sequence never admitted); the front end reuses
    those slots.
    ``timings``: what the step measured (``None`` when no step ran)."""

    updates: list[SequenceOutput]
    stats: EngineStatistics  # the step loop's, as of this message
    pixels_read: list[int] = field(default_factory=list)
    timings: StepTimings | None = None


@dataclass(frozen=True)
class WorkerStart:
    """The first message to the engine worker: the model to load and the engine's config."""

    model_path: str
    config: EngineConfig
    slots: SlotSpec | None = None  # the front end's pixel slots, to attach to


@dataclass(frozen=True)
class WorkerReady:
    max_model_len: int
    supports_images: bool
    pid: int


@dataclass(frozen=True)
class WorkerFailed:
    """The worker could not start (e.g. the model did not load); it exits after sending."""

    message: str
