"""Per-request sampling parameters, validated once at the boundary."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import SamplingParamError

MAX_TOP_LOGPROBS = 20
GREEDY_TEMPERATURE = 1e-5  # below this, sampling is greedy (as in vLLM)


@dataclass(frozen=True)
class SamplingParams:
    """What one sequence asks of the sampler and the stop checker.

    ``temperature`` below 1e-5 means greedy. ``top_k <= 0`` and ``top_p == 1`` and ``min_p == 0``
    disable those filters. ``logprobs`` is ``None`` for no logprobs, else the number of top
    alternatives (0..20) returned beside each sampled token's own logprob. ``grammar``, when
    set, is llguidance grammar text the output must match (``engine.grammar``): plain text,
    so the parameters pickle to the engine worker, which compiles it. ``min_tokens``: no
    end-of-sequence or ``stop_token_ids`` token before that many output tokens (vLLM's
    rule). ``logit_bias``: (token id, bias) pairs added to the logits before any filter
    (OpenAI's rule; ids beyond the model's vocabulary are ignored).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    grammar: str | None = None
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        self._check(self.max_tokens >= 1, "max_tokens", "must be at least 1")
        self._check(self.temperature >= 0, "temperature", "must be non-negative")
        self._check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self._check(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        self._check(-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]")
        self._check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]")
        self._check(self.repetition_penalty > 0, "repetition_penalty", "must be positive")
        self._check(
            self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
            "logprobs",
            f"must be between 0 and {MAX_TOP_LOGPROBS}",
        )
        self._check(all(s for s in self.stop), "stop", "stop strings must be non-empty")
        self._check(0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be between 0 and max_tokens")
        self._check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be non-negative")
        self._check(
            all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias),
            "logit_bias",
            "keys must be token ids and values between -100 and 100",
        )
        self._check(
            self.seed is None or -(2**63) <= self.seed < 2**64,
            "seed",
            "must fit in 64 bits",
        )

    @staticmethod
    def _check(ok: bool, field: str, rule: str) -> None:
        if not ok:
            raise SamplingParamError(field, rule)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
