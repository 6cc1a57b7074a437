"""The engine's settings: one frozen value, given to whichever placement runs the engine.

Each field's ``help`` metadata is its documentation; ``server.options`` turns the fields
into CLI flags and ``VLSERVE_*`` variables (``option`` metadata, where present, is the
flag's name when it differs from the field's). No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.malloc_tunables import WORKER_MALLOC_TUNABLES

# streams handed their new output per event-loop pass (engine.output_fanout); 8, not 16:
# in text bursts at 64 the front end's loop-lag p99 fell from 15 to 12-14 ms at the same
# throughput, for ~1-3 us more CPU per token (docs/architecture.md, "The path of a probe")
STREAM_FANOUT = 8


@dataclass(frozen=True)
class EngineConfig:
    """How the engine loads the model, batches sequences and streams their output."""

    dtype: str = field(
        default="auto",
        metadata={"help": "model dtype: auto, float32, bfloat16 or float16"},
    )
    device: str = field(
        default="cpu",
        metadata={"help": "torch device of the model (cpu, cuda, cuda:1, ...)"},
    )
    max_model_len: int = field(
        default=4096,
        metadata={"help": "context length in tokens (prompt plus completion), capped by the model's"},
    )
    max_num_seqs: int = field(
        default=256,
        metadata={"help": "sequences decoded together in one batch; more requests wait for a row (vLLM's default)"},
    )
    max_num_batched_tokens: int = field(
        default=8192,
        metadata={
            "help": "tokens one step runs, decodes and prefill chunks together (a longer prompt "
            "is prefilled in chunks over several steps; whole and alone under --no-chunked-prefill)"
        },
    )
    chunked_prefill: bool = field(
        default=True,
        metadata={"help": "prefill long prompts in chunks within the step token budget, between decodes"},
    )
    kv_cache_memory: float = field(
        default=0.0,
        metadata={
            "help": "MiB of KV cache blocks (0: enough for max-num-seqs sequences of max-model-len "
            "tokens, at most half the free device memory); reported at start"
        },
    )
    kv_block_size: int = field(default=16, metadata={"help": "tokens per KV cache block"})
    prefix_caching: bool = field(
        default=True,
        metadata={"help": "reuse the KV cache blocks of earlier prompts with the same prefix (and images)"},
    )
    in_worker_process: bool = field(
        default=True,
        metadata={
            "option": "engine_process",
            "help": "run the engine (scheduler, model, sampler) in its own worker process; "
            "--no-engine-process runs it in a thread of the server process",
        },
    )
    torch_threads: int = field(
        default=0,
        metadata={
            "option": "engine_torch_threads",
            "help": "torch threads in the engine worker process (0: CPUs minus one, at least one)",
        },
    )
    nice: int = field(
        default=10,
        metadata={
            "option": "engine_nice",
            "help": "niceness added to the engine worker process, so that on a CPU host the "
            "event loop (and /health) wins a core (bench/README.md: 10 vs 0)",
        },
    )
    encoder_threads: int = field(
        default=0,
        metadata={
            "option": "engine_encoder_threads",
            "help": "torch threads for a vision-encoder forward that holds an image of at least "
            "--engine-encoder-threads-min-patches patches (0: one with --vision-ahead, whose thread is the "
            "encoder's second core; else every CPU in the engine worker process; no extra ones with "
            "--no-engine-process, where waiting OpenMP threads would spin against the event loop); such an "
            "image's attention splits well, other forwards stay on --engine-torch-threads (bench/README.md)",
        },
    )
    encoder_threads_min_patches: int = field(
        default=4096,
        metadata={
            "option": "engine_encoder_threads_min_patches",
            "help": "vision patches of the largest image in a forward from which it runs on "
            "--engine-encoder-threads (4,096: about a 900x900 image; Qwen2-VL's default max_pixels "
            "makes a 1024x1024 photo 5,476)",
        },
    )
    malloc_tunables: str = field(
        default=WORKER_MALLOC_TUNABLES,
        metadata={
            "option": "engine_malloc_tunables",
            "help": "glibc malloc settings (GLIBC_TUNABLES syntax) for the engine worker process, after any "
            "the environment sets; the default keeps freed memory for reuse instead of returning it to "
            "the kernel, which then refaults it ('' for glibc's own behaviour; bench/README.md)",
        },
    )
    decode_steps_per_call: int = field(
        default=4,
        metadata={"help": "decode steps one engine call may run while no request joins or leaves"},
    )
    stream_interval: float = field(
        default=0.01,
        metadata={"help": "minimum seconds between two deltas of one request (faster tokens are sent together)"},
    )
    stream_fanout: int = field(
        default=STREAM_FANOUT,
        metadata={
            "help": "streams handed their new output per event-loop pass when a step's outputs arrive "
            "(the rest in the next passes), so /health waits behind at most this many streams' work"
        },
    )
    vision_max_batch_size: int = field(default=16, metadata={"help": "images per vision-encoder forward"})
    vision_max_batch_patches: int = field(default=32768, metadata={"help": "image patches per vision-encoder forward"})
    vision_step_patches: int = field(
        default=32768,
        metadata={
            "help": "image patches encoded per engine step at most (the encoder budget: images over it "
            "wait for the next step, so running streams are not stalled by a burst of images)"
        },
    )
    vision_ahead: bool = field(
        default=True,
        metadata={
            "help": "on a CPU device, encode the images of waiting requests on a thread of their own in the "
            "engine worker process while running requests decode, instead of in the step that prefills them "
            "(never with --no-engine-process, where that thread would hold the event loop's GIL; "
            "bench/README.md)"
        },
    )
    mm_cache_mb: int = field(default=256, metadata={"help": "MiB of image features kept for repeated images"})
    seed: int | None = field(
        default=None,
        metadata={
            "option": "engine_seed",
            "help": "seed of the sampler for requests without a seed (default: random)",
        },
    )

    def encodes_ahead(self, device_type: str) -> bool:
        """Whether the vision encoder gets its ahead thread on a device of this type: asked
        for (``vision_ahead``), in the engine worker process (in the server process it would
        hold the event loop's GIL) and on a CPU, where the device is cores and the ahead
        thread is a second one's work; a GPU is one device, which the step thread alone
        uses (docs/architecture.md, "Encoding ahead")."""
        return self.vision_ahead and self.in_worker_process and device_type == "cpu"

    def __post_init__(self) -> None:
        for name in (
            "max_model_len",
            "max_num_seqs",
            "max_num_batched_tokens",
            "kv_block_size",
            "decode_steps_per_call",
            "stream_fanout",
            "vision_max_batch_size",
            "vision_max_batch_patches",
            "vision_step_patches",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1, got {value!r}")
        if self.stream_interval < 0:
            raise ValueError(f"EngineConfig.stream_interval must be >= 0, got {self.stream_interval!r}")
        if self.kv_cache_memory < 0:
            raise ValueError(f"EngineConfig.kv_cache_memory must be >= 0, got {self.kv_cache_memory!r}")
        for name in ("torch_threads", "encoder_threads", "encoder_threads_min_patches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 0, got {value!r}")
