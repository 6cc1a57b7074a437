"""The engine as LMDeploy runs it: an asyncio step loop, each step in a one-thread executor.

The step loop plans on the event loop (the same synchronous ``Scheduler`` vlserve uses),
runs ``EngineCore.execute(plan)`` in a dedicated single-thread executor, and hands each
sequence's updates to that request's ``asyncio.Queue``. The queue is bounded by the
sequence's ``max_tokens`` (one update per step at most, plus the final one), so
``put_nowait`` never fails and nothing grows without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from engine.core_messages import SequenceOutput
from engine.engine_core import EngineCore
from engine.model_loader import LoadedModel
from engine.model_runner import ModelRunner
from engine.prompt import EnginePrompt
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from vl.errors import InvalidRequest


class AsyncioEngine:
    def __init__(self, core: EngineCore, scheduler: Scheduler) -> None:
        self._core = core
        self._scheduler = scheduler
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._ids = itertools.count()
        self._queues: dict[int, tuple[Sequence, asyncio.Queue[SequenceOutput]]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    @classmethod
    def for_model(cls, loaded: LoadedModel, *, max_num_seqs: int, max_num_batched_tokens: int) -> AsyncioEngine:
        """The same composition as ``engine.step_loop.StepLoop.for_model``."""
        runner = ModelRunner(loaded.adapter, loaded.device)
        core = EngineCore(
            runner,
            loaded.tokenizer.backend_tokenizer,
            loaded.eos_token_ids,
            loaded.max_model_len,
            Sampler(),
        )
        scheduler = Scheduler(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, blocks=runner.blocks
        )
        return cls(core, scheduler)

    @property
    def max_model_len(self) -> int:
        return self._core.max_model_len

    def start(self) -> None:
        """Start the step loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._step_loop())

    async def stop(self) -> None:
        """Cancel the step loop, wait for the step in its thread, and end every stream."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
        for seq, queue in list(self._queues.values()):
            if not queue.full():
                queue.put_nowait(SequenceOutput(seq.seq_id, [], "", None, "abort"))

    def check_lengths(self, prompt: EnginePrompt, params: SamplingParams) -> None:
        """Raise ``InvalidRequest`` if the prompt plus ``max_tokens`` cannot fit."""
        n = len(prompt.token_ids)
        if n == 0 or n + params.max_tokens > self._core.max_model_len:
            raise InvalidRequest(
                f"prompt of {n} tokens plus max_tokens={params.max_tokens} does not fit in "
                f"{self._core.max_model_len} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )

    @contextlib.asynccontextmanager
    async def open_stream(
        self, prompt: EnginePrompt, params: SamplingParams
    ) -> AsyncIterator[AsyncIterator[list[SequenceOutput]]]:
        """Submit a sequence; yield an iterator of its updates, in batches of whatever had
        arrived when the consumer asked (so a slow consumer gets fewer, larger batches).

        Leaving the block before the final update aborts the sequence (as vlserve does).
        Cancellation (asyncio): the consumer's ``CancelledError`` leaves the block, which
        aborts the sequence; a running one leaves the batch at the next step.
        """
        seq = Sequence(next(self._ids), prompt, params)
        queue: asyncio.Queue[SequenceOutput] = asyncio.Queue(maxsize=params.max_tokens + 2)
        self._queues[seq.seq_id] = (seq, queue)
        self._scheduler.add(seq)
        self._wakeup.set()
        try:
            yield self._updates(queue)
        finally:
            self._queues.pop(seq.seq_id, None)
            if not seq.finished:
                self._scheduler.abort(seq)
                self._wakeup.set()

    @staticmethod
    async def _updates(queue: asyncio.Queue[SequenceOutput]) -> AsyncIterator[list[SequenceOutput]]:
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            yield batch
            if batch[-1].finish_reason is not None:
                return

    async def _step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._scheduler.has_work():
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            plan = self._scheduler.schedule()
            if plan.empty:
                await asyncio.sleep(0)
                continue
            report = await loop.run_in_executor(self._executor, self._core.execute, plan)
            for update in report.updates:
                entry = self._queues.get(update.seq_id)
                if entry is not None:
                    entry[1].put_nowait(update)
