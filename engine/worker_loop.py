"""The engine worker's main loop: plain synchronous code in its own process.

The worker owns the scheduler and the engine core. It applies what the front end sent
(new sequences, aborts), runs one step while there is work, and sends each step's
outputs back; with nothing to do it blocks on its socket. Because the step loop never
waits for the front end's event loop (nor shares its GIL), a busy front end slows only
the delivery of tokens, never their production.
"""

from __future__ import annotations

from engine.engine_core import EngineCore, StepReport
from engine.scheduler import Scheduler, StepPlan
from engine.sequence import Sequence, SequenceStatus
from engine.step_tally import EngineStatistics, StepTally
from engine.wire import BlockingMessageSocket, NewSequence, OutputUpdate, StepOutputs, Submit


class WorkerLoop:
    def __init__(self, core: EngineCore, scheduler: Scheduler, channel: BlockingMessageSocket) -> None:
        self._core = core
        self._scheduler = scheduler
        self._channel = channel
        self._sequences: dict[int, Sequence] = {}
        self._tally = StepTally()

    def run(self) -> None:
        """Serve until the front end closes its end of the socket."""
        while True:
            idle = not self._scheduler.has_work()
            messages = self._channel.receive_all(block=idle)
            if self._channel.closed:
                return
            for message in messages:
                if isinstance(message, Submit):
                    self._apply(message)
            if not self._scheduler.has_work():
                if messages:
                    self._send([])  # e.g. only aborts of waiting sequences: stats changed
                continue
            plan = self._scheduler.schedule()
            if plan.empty:
                continue
            self._send(self._step(plan))

    def _apply(self, submit: Submit) -> None:
        for new in submit.adds:
            self._add(new)
        for seq_id in submit.aborts:
            seq = self._sequences.get(seq_id)
            if seq is None:
                continue  # finished and gone already
            was_waiting = seq.status is SequenceStatus.WAITING
            self._scheduler.abort(seq)
            if was_waiting:  # a running one leaves (and is forgotten) at the next step
                self._sequences.pop(seq_id, None)

    def _add(self, new: NewSequence) -> None:
        seq = Sequence(new.seq_id, new.prompt, new.params)
        self._sequences[seq.seq_id] = seq
        self._scheduler.add(seq)

    def _step(self, plan: StepPlan) -> list[OutputUpdate]:
        report: StepReport = self._core.execute(plan)
        for seq in plan.leaving:
            self._sequences.pop(seq.seq_id, None)
        self._tally.record(report)
        updates = []
        for update in report.updates:
            seq = update.seq
            updates.append(
                OutputUpdate(seq.seq_id, update.token_ids, update.text, update.logprobs, update.finish_reason, seq.error)
            )
        return updates

    def _send(self, updates: list[OutputUpdate]) -> None:
        self._channel.send(StepOutputs(updates, self.statistics()))

    def statistics(self) -> EngineStatistics:
        return self._tally.statistics(self._scheduler, self._core.runner)
