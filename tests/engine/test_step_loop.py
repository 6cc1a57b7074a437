"""The one step loop (``engine.step_loop.StepLoop``), with a fake engine core: adds, aborts
of waiting and running sequences (its worker-process event loop: tests/engine/test_worker_loop.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.core_messages import NewSequence, SequenceOutput, StepOutputs, Submit
from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, StepPlan
from engine.sequence import Sequence, SequenceStatus
from engine.step_loop import StepLoop


class FakeRunner:
    def __init__(self) -> None:
        self.rows: dict[int, Sequence] = {}

    def cache_tokens(self) -> int:
        return sum(seq.num_tokens for seq in self.rows.values())

    def cache_bytes(self) -> int:
        return 8 * self.cache_tokens()


@dataclass
class FakeReport:
    updates: list[SequenceOutput] = field(default_factory=list)
    prefill_tokens: int = 0
    seconds: float = 0.0


class FakeCore:
    """Emits token ``len(output)`` for every running row; finishes at ``max_tokens``."""

    encoder = None  # text only

    def __init__(self) -> None:
        self.runner = FakeRunner()
        self.plans: list[StepPlan] = []

    def admit_images(self, seq: Sequence) -> None:
        pass

    def release_images(self, seq: Sequence) -> None:
        pass

    def execute(self, plan: StepPlan) -> FakeReport:
        self.plans.append(plan)
        report = FakeReport()
        for seq in plan.leaving:
            self.runner.rows.pop(seq.seq_id, None)
        for seq in plan.joining:
            self.runner.rows[seq.seq_id] = seq
            report.prefill_tokens += seq.prompt_len
        for seq in plan.decoding + plan.joining:
            token = len(seq.output_ids)
            seq.output_ids.append(token)
            finish = "length" if len(seq.output_ids) >= seq.params.max_tokens else None
            if finish:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, finish
            report.updates.append(SequenceOutput(seq.seq_id, [token], str(token), None, finish))
        return report


def new(seq_id: int, max_tokens: int = 3) -> NewSequence:
    return NewSequence(seq_id, EnginePrompt([1, 2]), SamplingParams(max_tokens=max_tokens))


def make_loop(max_num_seqs: int = 8) -> tuple[StepLoop, FakeCore]:
    core = FakeCore()
    return StepLoop(core, Scheduler(max_num_seqs=max_num_seqs, max_num_batched_tokens=100)), core


def run_until_idle(loop: StepLoop) -> list[SequenceOutput]:
    updates = []
    for _ in range(100):
        if not loop.has_work():
            return updates
        updates.extend(loop.step().updates)
    raise AssertionError("the loop never went idle")


def test_added_sequences_run_to_the_end_and_are_forgotten():
    loop, _ = make_loop()
    first = loop.step(Submit([new(1, 3), new(2, 2)]))
    assert [(u.seq_id, u.token_ids) for u in first.updates] == [(1, [0]), (2, [0])]
    assert first.stats.running == 2 and first.stats.prompt_tokens == 4
    rest = run_until_idle(loop)
    by_id = {1: [0], 2: [0]}
    for update in rest:
        by_id[update.seq_id] += update.token_ids
    assert by_id == {1: [0, 1, 2], 2: [0, 1]}
    stats = loop.statistics()
    assert (stats.running, stats.waiting, stats.cache_tokens) == (0, 0, 0)
    assert stats.generation_tokens == 5
    assert loop._sequences == {}


def test_abort_of_a_waiting_sequence_drops_it_before_any_step():
    loop, core = make_loop(max_num_seqs=1)
    loop.step(Submit([new(1, 10), new(2, 10)]))  # 2 waits: the batch holds one
    assert loop.statistics().waiting == 1
    outputs = loop.step(Submit(aborts=[2]))
    assert 2 not in loop._sequences
    assert outputs.stats.waiting == 0
    loop.step(Submit(aborts=[1]))
    run_until_idle(loop)
    assert all(seq.seq_id != 2 for plan in core.plans for seq in plan.joining)


def test_abort_of_a_running_sequence_frees_its_rows_at_the_next_step():
    loop, core = make_loop()
    loop.step(Submit([new(1, 50), new(2, 4)]))
    outputs = loop.step(Submit(aborts=[1]))
    assert [seq.seq_id for seq in core.plans[-1].leaving] == [1]
    assert 1 not in core.runner.rows and 1 not in loop._sequences
    assert all(u.seq_id == 2 for u in outputs.updates)
    assert all(u.seq_id == 2 for u in run_until_idle(loop))
    assert loop.statistics().cache_tokens == 0


def test_aborts_of_unknown_or_finished_ids_are_ignored():
    loop, _ = make_loop()
    loop.step(Submit([new(1, 1)]))
    run_until_idle(loop)
    outputs = loop.step(Submit(aborts=[1, 99]))
    assert outputs.updates == [] and not loop.has_work()


def test_an_idle_step_reports_statistics_only():
    loop, core = make_loop()
    outputs = loop.step(Submit())
    assert outputs == StepOutputs([], loop.statistics())
    assert core.plans == []


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_step_reports_its_seconds_and_the_queue_time_of_the_sequences_it_first_schedules():
    """A step's ``timings``: the core's step seconds, and one queue time per sequence it
    schedules for the first time (arrival in the loop to that step); a sequence waiting
    behind a full batch counts its whole wait; idle outputs carry no timings."""
    clock = FakeClock()
    core = FakeCore()
    loop = StepLoop(core, Scheduler(max_num_seqs=1, max_num_batched_tokens=100), clock)
    first = loop.step(Submit([new(1, 2), new(2, 1)]))  # 2 waits: the batch holds one
    assert first.timings.queue_seconds == (0.0,)
    assert first.timings.step_seconds == 0.0 and first.timings.encoder_batches == ()
    clock.now += 1.5
    second = loop.step()  # 1 finishes (max_tokens 2)
    assert second.timings.queue_seconds == ()
    clock.now += 2.0
    third = loop.step()  # 1 leaves, 2 joins after 3.5 s in the queue
    assert [seq.seq_id for seq in core.plans[-1].joining] == [2]
    assert third.timings.queue_seconds == (3.5,)
    run_until_idle(loop)
    assert loop._arrived == {}
    assert loop.step().timings is None


def test_an_aborted_waiting_sequence_leaves_no_queue_time():
    loop, _ = make_loop(max_num_seqs=1)
    loop.step(Submit([new(1, 3), new(2, 3)]))
    loop.step(Submit(aborts=[2]))
    assert 2 not in loop._arrived
    queued = [len(outputs.timings.queue_seconds) for outputs in iter_steps(loop) if outputs.timings]
    assert sum(queued) == 0


def iter_steps(loop: StepLoop):
    for _ in range(100):
        if not loop.has_work():
            return
        yield loop.step()
