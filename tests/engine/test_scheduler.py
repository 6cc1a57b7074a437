"""The scheduler alone (no torch): FIFO admission, batch bounds, token budget, aborts."""

from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


def seq(i, n):
    return Sequence(i, EnginePrompt(list(range(n))), SamplingParams())


def test_fifo_and_max_num_seqs():
    s = Scheduler(max_num_seqs=2, max_num_batched_tokens=1000)
    seqs = [seq(i, 5) for i in range(4)]
    for x in seqs:
        s.add(x)
    plan = s.schedule()
    assert plan.joining == seqs[:2] and plan.decoding == []
    plan = s.schedule()
    assert plan.joining == [] and plan.decoding == seqs[:2]
    seqs[0].status = SequenceStatus.FINISHED
    plan = s.schedule()
    assert plan.leaving == [seqs[0]]
    assert plan.decoding == [seqs[1]] and plan.joining == [seqs[2]]


def test_token_budget_splits_prefill_but_oversized_prompt_still_runs():
    s = Scheduler(max_num_seqs=8, max_num_batched_tokens=10)
    a, b, c = seq(0, 6), seq(1, 6), seq(2, 50)
    for x in (a, b, c):
        s.add(x)
    assert s.schedule().joining == [a]
    assert s.schedule().joining == [b]
    assert s.schedule().joining == [c]  # larger than the budget: runs as the first joiner


def test_abort_waiting_and_running():
    s = Scheduler(max_num_seqs=1, max_num_batched_tokens=100)
    a, b = seq(0, 3), seq(1, 3)
    s.add(a)
    s.add(b)
    s.schedule()
    s.abort(b)  # waiting: dropped at once
    assert s.num_waiting == 0 and b.finish_reason == "abort"
    s.abort(a)  # running: leaves at the next step
    plan = s.schedule()
    assert plan.leaving == [a] and plan.decoding == [] and not s.has_work()


def test_encoder_budget_spreads_image_heavy_joiners_over_steps():
    """Sequences whose images would take more patches than the step's encoder budget wait
    for the next step; one over the budget alone still joins, alone."""
    patches = {0: 600, 1: 600, 2: 0, 3: 5000}
    s = Scheduler(
        max_num_seqs=8,
        max_num_batched_tokens=1000,
        max_encoder_patches=1000,
        encoder_cost=lambda sq: patches[sq.seq_id],
    )
    a, b, c, d = (seq(i, 5) for i in range(4))
    for x in (a, b, c, d):
        s.add(x)
    assert s.schedule().joining == [a]
    assert s.schedule().joining == [b, c]  # c needs no encoding; d does not fit after b
    assert s.schedule().joining == [d]
