"""One generation request as the engine sees it: prompt, parameters, output so far, status."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Mutable per-sequence state.

    Ownership: the step loop (``engine.step_loop``) alone, in whichever thread or process it
    runs: its scheduler moves a sequence between queues and sets ``abort_requested``, its
    engine core appends outputs. The front end never sees a ``Sequence``, only the
    ``SequenceOutput``s of each step.
    """

    seq_id: int
    prompt: EnginePrompt
    params: SamplingParams
    status: SequenceStatus = SequenceStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    abort_requested: bool = False
    rope_delta: int = 0
    error: str | None = None
    # paged KV cache (engine.block_manager): blocks held, tokens whose keys and values
    # are in them, and the prefix-cache hashes of the sequence's full blocks
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_hashes: list[int] | None = None
    num_registered: int = 0
    hash_limit: int = 0
    image_keys: tuple[int, tuple[str, ...]] | None = None

    @property
    def prefilled(self) -> bool:
        """True once every token but the last sampled one is in the cache (it decodes)."""
        return bool(self.output_ids) and self.num_computed_tokens >= self.num_tokens - 1

    @property
    def prompt_len(self) -> int:
        return len(self.prompt.token_ids)

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
