"""Block accounting of the paged KV cache alone (no torch): allocation, prefix caching by
chained block hashes (images keyed by content), LRU eviction, and all blocks free again."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager, NoFreeBlocks
from engine.prompt import EnginePrompt, ImageFeatures, ImageInput
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

IMG = 99


def seq(i, tokens, images=()):
    return Sequence(i, EnginePrompt(list(tokens), list(images)), SamplingParams())


def run_prompt(blocks: BlockManager, s: Sequence) -> None:
    """What the scheduler and runner do for a whole prompt: start, allocate, compute."""
    blocks.start(s)
    blocks.allocate(s, s.num_tokens)
    blocks.count_query(s)
    blocks.computed(s, s.num_tokens - s.num_computed_tokens)


def test_a_freed_prompt_s_full_blocks_are_reused_by_the_same_prefix():
    blocks = BlockManager(8, 4)
    a = seq(0, range(10))  # blocks: [0..3] [4..7] [8, 9]
    run_prompt(blocks, a)
    assert len(a.block_table) == 3 and blocks.num_free == 5
    held = list(a.block_table)
    blocks.free(a)
    assert blocks.all_free() and blocks.statistics().cached == 2  # the two full blocks
    b = seq(1, [*range(8), 50, 51, 52])
    blocks.start(b)
    assert b.block_table == held[:2] and b.num_computed_tokens == 8
    blocks.count_query(b)
    assert (blocks.prefix_queries, blocks.prefix_hits) == (10 + 11, 8)
    blocks.free(b)
    assert blocks.all_free()


def test_a_prompt_found_whole_still_computes_its_last_token():
    blocks = BlockManager(8, 4)
    a = seq(0, range(8))
    run_prompt(blocks, a)
    blocks.free(a)
    b = seq(1, range(8))
    blocks.start(b)
    assert b.num_computed_tokens == 4  # not 8: the last token must run to give logits
    blocks.free(b)


def test_shared_blocks_are_held_by_both_and_freed_by_the_last():
    blocks = BlockManager(8, 4)
    a, b = seq(0, range(9)), seq(1, range(9))
    run_prompt(blocks, a)
    run_prompt(blocks, b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert blocks.num_free == 8 - 4
    blocks.free(a)
    assert blocks.num_free == 8 - 3  # the shared two are still b's
    blocks.free(b)
    assert blocks.all_free()


def test_cached_blocks_are_evicted_least_recently_freed_first():
    blocks = BlockManager(4, 2)
    a, b = seq(0, range(3)), seq(1, range(10, 13))  # one full block each, one partial
    run_prompt(blocks, a)
    run_prompt(blocks, b)
    blocks.free(a)
    blocks.free(b)
    assert blocks.statistics().cached == 2
    c = seq(2, range(20, 27))  # needs all 4 blocks: evicts both cached
    blocks.start(c)
    blocks.allocate(c, 7)
    assert blocks.statistics().cached == 0
    blocks.free(c)
    again = seq(3, range(3))
    blocks.start(again)
    assert again.num_computed_tokens == 0  # a's block was evicted
    blocks.free(again)


def test_allocation_beyond_the_pool_raises_and_changes_nothing():
    blocks = BlockManager(2, 4)
    s = seq(0, range(12))
    blocks.start(s)
    with pytest.raises(NoFreeBlocks):
        blocks.allocate(s, 12)
    assert s.block_table == [] and blocks.all_free()
    assert not blocks.allocate_all([(s, 4), (seq(1, range(8)), 8)])
    assert blocks.all_free()


def test_same_placeholder_tokens_with_different_images_share_only_the_text_before():
    blocks = BlockManager(16, 4, image_token_id=IMG)
    tokens = [1, 2, 3, 4, 5, 6, IMG, IMG, IMG, IMG, IMG, IMG, 7, 8, 9]
    a = seq(0, tokens, [ImageInput("cat", (1, 4, 6), None)])
    run_prompt(blocks, a)
    blocks.free(a)
    other = seq(1, tokens, [ImageInput("dog", (1, 4, 6), None)])
    blocks.start(other)
    assert other.num_computed_tokens == 4  # the block with the first image token differs
    blocks.free(other)
    same = seq(2, tokens, [ImageInput("cat", (1, 4, 6), None)])
    blocks.start(same)
    assert same.num_computed_tokens == 12
    blocks.free(same)
    assert blocks.all_free()


def test_an_image_without_a_content_key_is_never_shared():
    blocks = BlockManager(16, 4, image_token_id=IMG)
    tokens = [1, 2, 3, 4, 5, 6, IMG, IMG, 7, 8, 9, 10, 11]
    features = ImageFeatures(embeddings=None, grid_thw=(1, 2, 4))
    a = seq(0, tokens, [features])
    run_prompt(blocks, a)
    blocks.free(a)
    assert blocks.statistics().cached == 1  # only the block before the image
    b = seq(1, tokens, [features])
    blocks.start(b)
    assert b.num_computed_tokens == 4
    blocks.free(b)


def test_no_prefix_caching_keeps_nothing():
    blocks = BlockManager(8, 4, prefix_caching=False)
    a = seq(0, range(9))
    run_prompt(blocks, a)
    blocks.free(a)
    b = seq(1, range(9))
    blocks.start(b)
    assert b.num_computed_tokens == 0 and blocks.statistics().cached == 0
    blocks.free(b)
    assert blocks.all_free()
