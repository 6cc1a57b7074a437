"""Who sends which request when: the closed-loop and open-loop (Poisson) drivers.

A driver calls ``send(index)`` for request indices in order and returns when every
request it started has ended. It stops *issuing* at ``stop_issuing`` (a ``trio.current_time``
deadline); bounding the requests already running is the caller's cancel scope.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable, Sequence

import trio

Send = Callable[[int], Awaitable[None]]


async def closed_loop(send: Send, indices: Sequence[int], concurrency: int, stop_issuing: float = math.inf) -> None:
    """``concurrency`` workers, each sending its next request when its last one ends.

    Cancellation: every worker is cancelled; requests in flight see the cancellation.
    """
    pending = iter(indices)

    async def worker() -> None:
        while trio.current_time() < stop_issuing:
            index = next(pending, None)
            if index is None:
                return
            await send(index)

    async with trio.open_nursery() as nursery:
        for _ in range(min(concurrency, len(indices))):
            nursery.start_soon(worker)


async def poisson(
    send: Send, indices: Sequence[int], rate: float, max_in_flight: int, seed: int, stop_issuing: float = math.inf
) -> None:
    """Requests arrive as a Poisson process of ``rate`` per second (seeded, so the arrival
    times repeat across servers); arrivals beyond ``max_in_flight`` wait for a slot, and one
    that is still waiting at ``stop_issuing`` is not sent.

    Cancellation: arrivals stop and every request in flight sees the cancellation.
    """
    rng = random.Random(seed)
    slots = trio.CapacityLimiter(max_in_flight)

    async def arrival(index: int) -> None:
        async with slots:
            if trio.current_time() < stop_issuing:
                await send(index)

    async with trio.open_nursery() as nursery:
        due = trio.current_time()
        for index in indices:
            due += rng.expovariate(rate)
            if due >= stop_issuing:
                break
            await trio.sleep_until(due)
            nursery.start_soon(arrival, index)
