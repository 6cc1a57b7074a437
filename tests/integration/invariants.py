"""Checks of the global invariants every cancellation test proves (docs/architecture.md, "Invariants")."""

from __future__ import annotations

import trio


def limiter_state(runtime) -> dict[str, tuple[int, int]]:
    """(borrowed, waiting) of every limiter a request can hold, by name."""
    stats = runtime.preparer.statistics()
    fetcher = stats.fetcher
    device = runtime.device_gate.statistics()
    default = trio.to_thread.current_default_thread_limiter().statistics()
    return {
        "image_prep": (stats.image_gate.borrowed, stats.image_gate.waiting),
        "tokenizer": (stats.tokenizer_gate.borrowed, stats.tokenizer_gate.waiting),
        "device": (device.borrowed_tokens, device.tasks_waiting),
        "fetch": (fetcher.limiter_borrowed, fetcher.waiting),
        "default_threads": (default.borrowed_tokens, default.tasks_waiting),
    }


def slots_idle(runtime) -> bool:
    """Every pixel slot is free and nobody waits for one (true for a text-only model)."""
    if runtime.slots is None:
        return True
    stats = runtime.slots.statistics()
    return stats.free == stats.total and stats.waiting == 0


async def wait_until_quiescent(runtime, timeout: float = 20.0) -> None:
    """Wait until no limiter is borrowed or waited on, every pixel slot is free, and the
    engine holds no sequences, no cache and no image waiting to be encoded. Fails the test
    if that never happens."""
    with trio.fail_after(timeout):
        while True:
            engine = runtime.engine.statistics()
            idle = all(v == (0, 0) for v in limiter_state(runtime).values())
            if (
                idle
                and slots_idle(runtime)
                and engine.running == 0
                and engine.waiting == 0
                and engine.cache_tokens == 0
                and engine.images_pending == 0
            ):
                return
            await trio.sleep(0.02)
