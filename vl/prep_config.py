"""Settings of request preparation: its gates and prep worker processes.

One frozen value owned by ``vl``; each field's ``help`` metadata documents it, and
``server.options`` turns the fields into CLI flags and ``VLSERVE_*`` variables (``option``
metadata, where present, is the flag's name when it differs from the field's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.malloc_tunables import WORKER_MALLOC_TUNABLES


@dataclass(frozen=True)
class PrepConfig:
    """How much preparation runs at once, and where.

    Gate sizes follow bench/README.md: GIL-bound work at 1, GIL-releasing work at the
    core count.
    """

    image_prep_concurrency: int = field(
        default=1,
        metadata={
            "help": "images decoded and preprocessed at once (the image gate's size; one prep process each). "
            "One keeps up with a 2-core host's engine and leaves it the CPU (bench/README.md: images at 64, "
            "req/s 15.5-15.9 vs 13.7-15.1 at 2, peak RSS 1.9 vs 2.5 GiB); raise it with more cores"
        },
    )
    tokenizer_concurrency: int = field(
        default=1,
        metadata={"help": "chat templates and tokenizations run at once (the tokenizer gate's size)"},
    )
    render_batch_size: int = field(
        default=8,
        metadata={
            "help": "chat templates rendered and tokenized in one call at most: the chats waiting for the tokenizer "
            "gate go through it together, and their requests wake together when it ends (bench/README.md, "
            "'Chats tokenized in batches': 32 doubled /health p99 in a 64-stream burst); 1 renders each alone"
        },
    )
    processes: bool = field(
        default=True,
        metadata={
            "option": "prep_processes",
            "help": "run template, tokenizer and image prep in worker processes (one per gate token), off the "
            "event loop's GIL; --no-prep-processes runs them in threads of the server process",
        },
    )
    nice: int = field(
        default=10,
        metadata={
            "option": "prep_nice",
            "help": "niceness added to each prep worker process (bench/README.md: p99 35 ms at 0, 10 ms at 10)",
        },
    )
    malloc_tunables: str = field(
        default=WORKER_MALLOC_TUNABLES,
        metadata={
            "option": "prep_malloc_tunables",
            "help": "glibc malloc settings (GLIBC_TUNABLES syntax) applied in each prep worker process when it "
            "starts, except those the environment sets; the default (the engine worker's) keeps freed memory "
            "for reuse, so an image's decoded and resized arrays are not refaulted page by page ('' for "
            "glibc's own behaviour; bench/README.md)",
        },
    )
    pixel_slots: int = field(
        default=16,
        metadata={
            "help": "shared-memory slots for preprocessed image pixels; a request takes one per image, all at "
            "once, when its images are fetched (waiting its turn while too few are free), and each is held until "
            "the engine has encoded its image (the engine reads the pixels in place); at least "
            "--max-images-per-request (the pool takes pixel-slots x pixel-slot-mb of /dev/shm)"
        },
    )
    pixel_slot_mb: int = field(
        default=0,
        metadata={
            "help": "MiB per pixel slot; 0 sizes slots for the largest image the image processor can produce "
            "(its max_pixels)"
        },
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.pixel_slots, int) and self.pixel_slots >= 1):
            raise ValueError(f"PrepConfig.pixel_slots must be an integer >= 1, got {self.pixel_slots!r}")
        if not (isinstance(self.render_batch_size, int) and self.render_batch_size >= 1):
            raise ValueError(f"PrepConfig.render_batch_size must be an integer >= 1, got {self.render_batch_size!r}")
        if not (isinstance(self.pixel_slot_mb, int) and self.pixel_slot_mb >= 0):
            raise ValueError(f"PrepConfig.pixel_slot_mb must be an integer >= 0, got {self.pixel_slot_mb!r}")
