"""The paged KV cache on the real tiny model, with a block pool small enough to force
prefix hits, chunked prefills and preemptions: every output still equals the request's
output alone (``generate()`` for greedy, the same seed alone for sampling), and every
block is free again at the end."""

from __future__ import annotations

import dataclasses

import pytest

from engine.core_messages import NewSequence, Submit
from engine.engine_core import EngineCore
from engine.model_runner import bytes_per_token
from engine.pixel_slots import SlotPool
from engine.prompt import EnginePrompt, ImageInput
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.step_loop import StepLoop
from tests.engine.configs import in_thread
from tests.engine.prompts import chat_prompt, noise_image, reference_generate

BLOCK = 4
TEXTS = [
    "hello world",
    "describe the cat in the picture please",
    "one two three four five six seven eight nine ten",
    "what",
    "red green blue yellow white black small large",
]
SYSTEM = "you are a careful assistant who answers every question in full sentences " * 3


class Recorded:
    """A step loop over the tiny model whose plans are kept (``plans``)."""

    def __init__(self, tiny_model, *, blocks: int, max_len: int = 80, view_pixels=None, **config) -> None:
        loaded = dataclasses.replace(tiny_model, max_model_len=max_len)
        mib = blocks * BLOCK * bytes_per_token(tiny_model.adapter) / 2**20
        cfg = in_thread(kv_cache_memory=mib, kv_block_size=BLOCK, **config)
        self.core = EngineCore.for_model(loaded, cfg, view_pixels=view_pixels)
        encoder = self.core.encoder
        self.scheduler = Scheduler(
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_encoder_patches=cfg.vision_step_patches,
            encoder_cost=(lambda seq: encoder.patches_to_encode(seq.seq_id)) if encoder else (lambda seq: 0),
            blocks=self.core.runner.blocks,
            chunked_prefill=cfg.chunked_prefill,
        )
        self.plans = []
        self.chunks = []  # (seq_id, first token, tokens, sequence's tokens) of each prefill chunk
        schedule = self.scheduler.schedule

        def recording():
            plan = schedule()
            self.plans.append(plan)
            self.chunks += [(seq.seq_id, seq.num_computed_tokens, n, seq.num_tokens) for seq, n in plan.prefill]
            return plan

        self.scheduler.schedule = recording
        self.loop = StepLoop(self.core, self.scheduler)

    def run(
        self, news: list[NewSequence], *, later: dict[int, list[NewSequence]] | None = None
    ) -> dict[int, list[int]]:
        """Run until idle; ``later[k]`` is submitted before step ``k``."""
        tokens: dict[int, list[int]] = {n.seq_id: [] for n in news}
        later = later or {}
        step = 0
        outputs = self.loop.step(Submit(list(news)))
        while True:
            for update in outputs.updates:
                tokens.setdefault(update.seq_id, []).extend(update.token_ids)
                assert update.error is None, update.error
            step += 1
            if step > 500:
                raise AssertionError("the loop never went idle")
            if step in later:
                outputs = self.loop.step(Submit(later[step]))
                continue
            if not self.loop.has_work() and not any(k > step for k in later):
                break
            outputs = self.loop.step()
        stats = self.loop.statistics()
        assert stats.kv_blocks_free == stats.kv_blocks_total and stats.cache_tokens == 0  # all free again
        assert self.core.runner.blocks.all_free()
        return tokens

    @property
    def chunked(self) -> int:
        """Prefill chunks that did not reach their sequence's last token."""
        return sum(1 for _, start, n, total in self.chunks if start + n < total)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("decode_steps_per_call", [1, 4])
def test_chunked_prefill_and_preemption_keep_greedy_outputs_equal_to_generate(tiny_model, decode_steps_per_call):
    """Invariant: with a pool of 24 blocks of 4 tokens (96 slots for five sequences that
    need up to ~69 each) and 16 tokens a step, prompts are prefilled in chunks, sequences
    are preempted and recomputed, and each greedy output equals ``generate()`` alone (also
    when one call runs several decode steps, each taking blocks as it goes)."""
    prompts = [chat_prompt(tiny_model, text) for text in TEXTS]
    max_tokens = [20 + 4 * i for i in range(len(prompts))]
    expected = [reference_generate(tiny_model, p, extra, n) for (p, extra), n in zip(prompts, max_tokens, strict=True)]
    engine = Recorded(tiny_model, blocks=24, max_num_batched_tokens=16, decode_steps_per_call=decode_steps_per_call)
    news = [NewSequence(i, p, greedy(n)) for i, ((p, _), n) in enumerate(zip(prompts, max_tokens, strict=True))]
    got = engine.run(news)
    assert [got[i] for i in range(len(news))] == expected
    stats = engine.loop.statistics()
    assert stats.preemptions > 0
    assert engine.chunked > 0


@pytest.mark.parametrize(("prefix_caching", "blocks"), [(False, 60), (True, 42)])
def test_stale_slots_never_reach_attention(tiny_model, prefix_caching, blocks):
    """Invariant: attention reads each row's blocks whole, and a slot past a row's context
    holds zero, never what was in memory before (``engine.paged_kv_cache``). Every slot
    of the pool starts as NaN here (what unwritten memory, or a block freed by a sequence
    whose values overflowed, may hold), and blocks are reused by preemptions, chunked
    prefills and prefix hits; a masked position still enters the attention's arithmetic
    (weight zero times value), so one NaN read would turn a row's logits to NaN. Every
    greedy output equals ``generate()`` alone."""
    texts = [SYSTEM + text for text in TEXTS[:3]] + TEXTS[3:]
    prompts = [chat_prompt(tiny_model, text) for text in texts]
    max_tokens = [12 + 3 * i for i in range(len(prompts))]
    expected = [reference_generate(tiny_model, p, extra, n) for (p, extra), n in zip(prompts, max_tokens, strict=True)]
    engine = Recorded(tiny_model, blocks=blocks, max_len=160, max_num_batched_tokens=24, prefix_caching=prefix_caching)
    cache = engine.core.runner.cache
    for pool in cache.key_pools + cache.value_pools:
        pool[: cache.pad_slot].fill_(float("nan"))
    news = [NewSequence(i, p, greedy(n)) for i, ((p, _), n) in enumerate(zip(prompts, max_tokens, strict=True))]
    got = engine.run(news[:3], later={6: news[3:]})
    assert [got[i] for i in range(len(news))] == expected
    assert engine.loop.statistics().preemptions > 0
    assert engine.chunked > 0
    if prefix_caching:
        assert engine.loop.statistics().prefix_cache_hits > 0


def test_preempted_seeded_sampling_resumes_with_identical_output(tiny_model):
    """Invariant: a seeded sampled request gives the same tokens whether it runs alone in
    a roomy cache or is preempted and recomputed in a tiny one."""
    prompts = [chat_prompt(tiny_model, text)[0] for text in TEXTS[:4]]
    params = [SamplingParams(max_tokens=24, temperature=0.9, top_k=50, seed=100 + i) for i in range(4)]
    alone = {}
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        roomy = Recorded(tiny_model, blocks=64)
        alone[i] = roomy.run([NewSequence(i, p, sp)])[i]
    tight = Recorded(tiny_model, blocks=20, max_num_batched_tokens=12)
    got = tight.run([NewSequence(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))])
    assert got == alone
    assert tight.loop.statistics().preemptions > 0


def test_a_shared_system_prompt_is_prefilled_once(tiny_model):
    """A second request with the same long system prompt reuses the first one's full
    blocks (counted as prefix hits) and still matches ``generate()``; with
    ``prefix_caching=False`` nothing is reused."""
    first, first_extra = chat_prompt(tiny_model, SYSTEM + "what is the capital of France?")
    second, second_extra = chat_prompt(tiny_model, SYSTEM + "name three colours")
    shared = 0
    while first.token_ids[shared] == second.token_ids[shared]:
        shared += 1
    assert shared >= 40
    engine = Recorded(tiny_model, blocks=64, max_len=160)
    got = engine.run([NewSequence(0, first, greedy(8))], later={12: [NewSequence(1, second, greedy(8))]})
    assert got[0] == reference_generate(tiny_model, first, first_extra, 8)
    assert got[1] == reference_generate(tiny_model, second, second_extra, 8)
    stats = engine.loop.statistics()
    assert stats.prefix_cache_hits == shared // BLOCK * BLOCK
    assert stats.prefix_cache_queries == len(first.token_ids) + len(second.token_ids)
    second_prefill = [(start, n) for seq_id, start, n, _ in engine.chunks if seq_id == 1]
    assert second_prefill == [(stats.prefix_cache_hits, len(second.token_ids) - stats.prefix_cache_hits)]

    off = Recorded(tiny_model, blocks=64, max_len=160, prefix_caching=False)
    again = off.run([NewSequence(0, first, greedy(8))], later={12: [NewSequence(1, second, greedy(8))]})
    assert again == got
    assert off.loop.statistics().prefix_cache_hits == 0


@pytest.fixture
def pool(tiny_model):
    with SlotPool.create(4, 8 << 20) as pool:
        yield pool


def image_request(tiny_model, pool, seq_id, seed, key, text="describe"):
    reference, extra = chat_prompt(tiny_model, text, noise_image(seed, 64, 96))
    pixels = pool.memory.write(seq_id % 4, extra["pixel_values"])
    grid = tuple(extra["image_grid_thw"][0].tolist())
    prompt = EnginePrompt(reference.token_ids, [ImageInput(key, grid, pixels)])
    return prompt, reference, extra


def test_image_blocks_are_shared_only_for_the_same_image(tiny_model, pool):
    """Invariant: two images of the same size have the same placeholder tokens; blocks
    from the first image token on are reused only for the same image (content key), and
    every output (chunked over several steps) equals ``generate()``."""
    cat, cat_ref, cat_extra = image_request(tiny_model, pool, 0, seed=1, key="cat")
    dog, dog_ref, dog_extra = image_request(tiny_model, pool, 1, seed=2, key="dog")
    cat2, _, _ = image_request(tiny_model, pool, 2, seed=1, key="cat")
    assert cat.token_ids == dog.token_ids
    first_image = cat.token_ids.index(tiny_model.model.config.image_token_id)
    engine = Recorded(tiny_model, blocks=64, max_num_batched_tokens=10, view_pixels=pool.memory.view)
    got = engine.run(
        [NewSequence(0, cat, greedy(6))],
        later={30: [NewSequence(1, dog, greedy(6))], 60: [NewSequence(2, cat2, greedy(6))]},
    )
    expected_cat = reference_generate(tiny_model, cat_ref, cat_extra, 6)
    assert got[0] == expected_cat and got[2] == expected_cat
    assert got[1] == reference_generate(tiny_model, dog_ref, dog_extra, 6)
    stats = engine.loop.statistics()
    dog_hit = first_image // BLOCK * BLOCK
    cat2_hit = (len(cat.token_ids) - 1) // BLOCK * BLOCK
    assert stats.prefix_cache_hits == dog_hit + cat2_hit
    assert engine.chunked > 0


def test_an_abort_frees_a_running_sequence_s_blocks_before_the_next_step(tiny_model):
    engine = Recorded(tiny_model, blocks=32)
    prompt, _ = chat_prompt(tiny_model, "hello world")
    engine.loop.step(Submit([NewSequence(0, prompt, greedy(50))]))
    engine.loop.step()
    assert engine.loop.statistics().kv_blocks_free < 32
    engine.loop.step(Submit(aborts=[0]))
    stats = engine.loop.statistics()
    assert stats.kv_blocks_free == 32 and stats.running == 0 and not engine.loop.has_work()


def test_max_model_len_over_the_pool_fails_at_start_with_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="cannot hold one sequence of max_model_len=128"):
        Recorded(tiny_model, blocks=31, max_len=128)
    Recorded(tiny_model, blocks=32, max_len=128)  # exactly one sequence fits
