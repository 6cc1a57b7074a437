"""The scheduler alone (no torch): FIFO admission, batch bounds, token budget, aborts."""

from engine.block_manager import BlockManager
from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


def seq(i, n):
    """Sequence ``i`` with ``n`` prompt tokens no other sequence shares."""
    return Sequence(i, EnginePrompt([1000 * i + t for t in range(n)]), SamplingParams())


def test_fifo_and_max_num_seqs():
    s = Scheduler(max_num_seqs=2, max_num_batched_tokens=1000)
    seqs = [seq(i, 5) for i in range(4)]
    for x in seqs:
        s.add(x)
    plan = s.schedule()
    assert plan.joining == seqs[:2] and plan.decoding == []
    assert list(s.waiting_newest_first()) == [seqs[3], seqs[2]]  # what the encoder takes ahead
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


def simulate(s: Scheduler, plan) -> None:
    """What the engine core does with a plan: every chunk and decode is computed; a
    sequence whose tokens are all computed samples token 7."""
    for x in plan.decoding:
        s.blocks.computed(x, 1)
    for x, n in plan.prefill:
        s.blocks.computed(x, n)
    for x in plan.decoding + [x for x, _ in plan.prefill]:
        if x.num_computed_tokens == x.num_tokens:
            x.output_ids.append(7)


def test_chunked_prefill_shares_the_token_budget_with_decodes():
    """A prompt over the step budget is prefilled in chunks while the running sequence
    keeps decoding one token a step."""
    blocks = BlockManager(64, 4)
    s = Scheduler(max_num_seqs=8, max_num_batched_tokens=10, blocks=blocks)
    short, long = seq(0, 5), seq(1, 25)
    s.add(short)
    simulate(s, s.schedule())
    s.add(long)
    chunks = []
    for _ in range(3):
        plan = s.schedule()
        assert plan.decoding == [short]
        chunks += [n for x, n in plan.prefill]
        simulate(s, plan)
    assert chunks == [9, 9, 7]  # 10 a step, one token of it for short's decode
    assert long.output_ids == [7] and len(short.output_ids) == 4
    assert s.schedule().decoding == [short, long]


def test_no_chunked_prefill_runs_an_oversized_prompt_whole():
    s = Scheduler(max_num_seqs=8, max_num_batched_tokens=10, blocks=BlockManager(64, 4), chunked_prefill=False)
    a, b = seq(0, 4), seq(1, 25)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    assert plan.prefill == [(a, 4)]
    simulate(s, plan)
    assert s.schedule().prefill == [(b, 25)]


def test_a_sequence_waits_until_its_blocks_fit():
    blocks = BlockManager(4, 4)
    s = Scheduler(max_num_seqs=8, max_num_batched_tokens=100, blocks=blocks)
    a, b = seq(0, 12), seq(1, 8)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    assert plan.joining == [a] and s.num_waiting == 1  # b's two blocks are not there
    simulate(s, plan)
    a.status = SequenceStatus.FINISHED
    plan = s.schedule()
    assert plan.leaving == [a] and plan.joining == [b]


def test_the_newest_sequence_is_preempted_when_decode_needs_a_block():
    """Out of blocks in decode: the newest running sequence gives its blocks back, waits at
    the head of the queue and is recomputed (prompt and outputs) when it joins again."""
    blocks = BlockManager(4, 4)
    s = Scheduler(max_num_seqs=8, max_num_batched_tokens=100, blocks=blocks)
    old, new = seq(0, 8), seq(1, 7)
    s.add(old)
    s.add(new)
    simulate(s, s.schedule())  # old: 2 blocks, new: 2 blocks, pool full
    plan = s.schedule()  # old's 9th token needs a third block
    assert plan.preempted == [new] and plan.decoding == [old]
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and s.preemptions == 1
    simulate(s, plan)
    old.status = SequenceStatus.FINISHED
    plan = s.schedule()
    # 7 prompt tokens + its output; its first block, cached when it was freed, is reused
    assert plan.joining == [new] and plan.prefill == [(new, 4)] and new.num_computed_tokens == 4
    simulate(s, plan)
    assert new.output_ids == [7, 7]
    new.status = SequenceStatus.FINISHED
    s.schedule()
    assert blocks.all_free() and not s.has_work()


def test_short_chunks_do_not_ride_along_a_long_one_past_the_padded_budget():
    """The step's prefill chunks run as one forward padded to the longest: a 40-token
    prompt and 6-token ones share a step only while rows x 40 fits the budget of 100 (two
    rows); the rest join the next step together (6 x 6 fits)."""
    s = Scheduler(max_num_seqs=16, max_num_batched_tokens=100, blocks=BlockManager(256, 4))
    long, shorts = seq(0, 40), [seq(i, 6) for i in range(1, 7)]
    for x in (long, *shorts):
        s.add(x)
    first = s.schedule()
    assert [x for x, _ in first.prefill] == [long, shorts[0]]
    rows = len(first.prefill)
    assert rows * max(n for _, n in first.prefill) <= 100
    simulate(s, first)
    second = s.schedule()
    assert [x for x, _ in second.prefill] == shorts[1:]
    assert second.decoding == [long, shorts[0]]
