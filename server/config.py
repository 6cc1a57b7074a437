"""Server configuration: one frozen dataclass holding the HTTP settings and the nested
settings of each layer (``EngineConfig``, ``PrepConfig``, ``MediaPolicy``).

Each field's ``help`` metadata documents it; ``server.options`` flattens the nested values
into CLI flags and ``VLSERVE_*`` variables, so a new setting touches its config class and
the code that uses it, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import EngineConfig
from vl.media_policy import MediaPolicy
from vl.prep_config import PrepConfig

METRICS_PREFIXES = ("vlserve", "vllm")


@dataclass(frozen=True)
class ServerConfig:
    """Everything a running vlserve needs to know. ``model=None`` means the built-in tiny model."""

    model: str | None = field(
        default=None,
        metadata={"help": "local Hugging Face model directory (default: the built-in tiny model)"},
    )
    served_model_name: str | None = field(
        default=None,
        metadata={"help": "model id clients send in 'model' (default: the directory's name)"},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "TCP port to listen on (0: any free port)"})
    api_keys: tuple[str, ...] = field(
        default=(),
        metadata={
            "option": "api_key",
            "help": "accepted Bearer key; repeat for several (default: no auth)",
        },
    )
    cors_allow_origins: tuple[str, ...] = field(
        default=(),
        metadata={"help": "origins allowed by CORS, '*' for any (default: no CORS)"},
    )
    max_body_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata={"help": "largest accepted request body in bytes (413 beyond)"},
    )
    max_concurrent_requests: int = field(default=256, metadata={"help": "requests in flight before refusing with 503"})
    switch_interval: float = field(
        default=0.001,
        metadata={"help": "seconds after which a GIL-holding thread must offer the GIL to the event loop"},
    )
    probe_lane: bool = field(
        default=True,
        metadata={
            "help": "answer /health and /ready on plain-TCP connections from a thread of their own, off the "
            "event loop (vlserve serve only; off: inside the loop's HTTP/1.1 protocol)"
        },
    )
    probe_lane_process: bool = field(
        default=True,
        metadata={
            "help": "run the probe lane in a process of its own, sharing no GIL with the server (off: a thread "
            "of the server process)"
        },
    )
    health_loop_stall: float = field(
        default=1.0,
        metadata={"help": "seconds the event loop may go without turning before /health answers 503 (0: never)"},
    )
    drain_grace: float = field(
        default=0.0,
        metadata={
            "help": "seconds after SIGINT/SIGTERM during which /ready answers 503 but new requests are still "
            "accepted and served, so that endpoints and load balancers stop routing here first"
        },
    )
    drain_timeout: float = field(
        default=30.0,
        metadata={"help": "seconds in-flight requests get to finish once the listener has closed (after the grace)"},
    )
    metrics_prefix: str = field(
        default="vlserve",
        metadata={"help": "prefix of the vLLM-named metrics on /metrics: vlserve, or vllm for vLLM's own dashboards"},
    )
    access_log: bool = field(
        default=True,
        metadata={"help": "one log line per API request on the vlserve.access logger"},
    )
    generation_config: str = field(
        default="auto",
        metadata={
            "help": "sampling defaults for fields a request leaves unset: 'auto' (the model's "
            "generation_config.json), 'vllm' (none), or a directory holding a generation_config.json"
        },
    )
    engine: EngineConfig = field(default_factory=EngineConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    media: MediaPolicy = field(default_factory=MediaPolicy)

    def __post_init__(self) -> None:
        if self.metrics_prefix not in METRICS_PREFIXES:
            raise ValueError(
                f"metrics_prefix must be one of {', '.join(METRICS_PREFIXES)}, not {self.metrics_prefix!r}"
            )
        if self.drain_grace < 0 or self.drain_timeout < 0 or self.health_loop_stall < 0:
            raise ValueError("drain_grace, drain_timeout and health_loop_stall must not be negative")
        if self.media.max_images_per_request > self.prep.pixel_slots:
            # a request takes one slot per image, all at once (``SlotPool.acquire_many``)
            raise ValueError(
                f"--max-images-per-request ({self.media.max_images_per_request}) must not exceed --pixel-slots "
                f"({self.prep.pixel_slots}): a request's images need a pixel slot each at the same time"
            )

    @property
    def model_name(self) -> str:
        """The id clients use in ``model``: the served name, else the model directory's name."""
        if self.served_model_name:
            return self.served_model_name
        if self.model:
            return self.model.rstrip("/").rsplit("/", 1)[-1]
        return "vlserve-tiny-qwen2-vl"
