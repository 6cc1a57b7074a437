"""Server configuration: one frozen dataclass, filled from CLI flags or environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerConfig:
    """Everything a running vlserve needs to know. ``model=None`` means the built-in tiny model."""

    model: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    cors_allow_origins: tuple[str, ...] = ()
    max_body_bytes: int = 64 * 1024 * 1024
    max_concurrent_requests: int = 256
    dtype: str = "auto"
    device: str = "cpu"
    # engine limits
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    # run the scheduler, model and sampler in a worker process (its own GIL and core);
    # false runs them in a thread of the server process
    engine_process: bool = True
    # torch intra-op threads in the engine worker (0: one fewer than the CPUs, at least
    # one, so the event loop keeps a core)
    engine_torch_threads: int = 0
    # added to the engine worker's niceness: on a CPU host the event loop (and /health)
    # then wins a core whenever both want one (bench/README.md: 10 vs 0)
    engine_nice: int = 10
    # decode steps one engine call may run back to back while no request joins or leaves
    decode_steps_per_call: int = 4
    # minimum seconds between two deltas of one request (faster tokens are sent together)
    stream_interval: float = 0.01
    # preparation gates (see DESIGN.md: GIL-bound work at 1, GIL-releasing at the core count)
    image_prep_concurrency: int = 2
    tokenizer_concurrency: int = 1
    # run the gated prep work (template, tokenizer, image decode + preprocess) in worker
    # processes, one per gate token, instead of threads that share the event loop's GIL
    # (bench/README.md: on images /health p99 ~8x lower, ~a third fewer req/s here)
    prep_processes: bool = False
    # added to each prep worker process's niceness: as for the engine worker, the event
    # loop then wins a core on a CPU host (bench/README.md: p99 35 ms at 0, 10 ms at 10)
    prep_nice: int = 10
    vision_max_batch_size: int = 16
    vision_max_batch_patches: int = 32768
    mm_cache_mb: int = 256
    # image sources and limits
    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] = ()
    allow_private_media_urls: bool = False
    max_images_per_request: int = 8
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 64 * 1024 * 1024
    image_fetch_timeout: float = 10.0
    image_fetch_concurrency: int = 16
    max_image_redirects: int = 3
    # GIL: how often the engine/prep threads must offer the GIL to the event loop (seconds)
    switch_interval: float = 0.001
    # timeouts
    drain_timeout: float = 30.0
    extra: dict = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        """The id clients use in ``model``: the served name, else the model directory's name."""
        if self.served_model_name:
            return self.served_model_name
        if self.model:
            return self.model.rstrip("/").rsplit("/", 1)[-1]
        return "vlserve-tiny-qwen2-vl"
