"""The engine as its callers see it: one typed interface, whichever placement runs it.

``engine.async_engine.AsyncEngine`` implements it (the step loop in a thread or in the
engine worker process); tests use fakes with the same shape. No torch import here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol

from engine.outputs import StreamDelta

if TYPE_CHECKING:
    from engine.prompt import EnginePrompt
    from engine.sampling_params import SamplingParams
    from engine.slot_lease import SlotLease


class DeltaStream(Protocol):
    """One sequence's output: an async iterator of coalesced deltas; ``error`` is set if
    the engine ended the sequence itself (finish reason ``"abort"``)."""

    @property
    def error(self) -> str | None: ...

    def __aiter__(self) -> AsyncIterator[StreamDelta]: ...


class EngineStats(Protocol):
    running: int
    waiting: int


class Engine(Protocol):
    """A running engine."""

    @property
    def max_model_len(self) -> int: ...

    def open_stream(
        self,
        prompt: EnginePrompt,
        params: SamplingParams,
        lease: SlotLease | None = None,
        *,
        final_only: bool = False,
    ) -> AbstractAsyncContextManager[DeltaStream]:
        """Submit a sequence; the block yields its stream, and leaving the block early
        aborts the sequence. ``lease`` holds the pixel slots of the prompt's images (the
        engine holds it until the step loop has read them). With ``final_only`` the stream
        yields one delta, the whole output, when the sequence ends (a response that is not
        streamed: its consumer then wakes once, not once per step). Raises
        ``engine.errors.RequestRejected`` for a request the engine refuses,
        ``RuntimeError`` if the engine is not running."""
        ...

    def is_healthy(self) -> bool: ...

    def statistics(self) -> EngineStats: ...
