"""Block accounting of the paged KV cache: which fixed-size blocks each sequence holds, and
which full blocks are kept for reuse by later sequences (prefix caching). No torch here.

A sequence's ``block_table`` lists its blocks in order: token ``t`` of the sequence (its
prompt, then its outputs) lives in block ``block_table[t // block_size]`` at offset
``t % block_size``. A block is *free* (on the free list), *held* (reference count >= 1),
or *cached* (count 0 but keeps a hash: reusable until evicted, least recently freed first).

Prefix caching: when every token of a block is computed, the block gets a hash chained
over all tokens before it (the previous block's hash, this block's token ids and, from
the block holding a prompt's first image token on, every image's content key:
``ImageInput.key``). A new sequence reuses the longest run of cached blocks that match
its prompt's hashes, read-only (it writes only from the first position after them).
A prompt with an image that has no key (features given directly) shares only the blocks
before that image.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from engine.prompt import ImageInput
from engine.sequence import Sequence


class NoFreeBlocks(Exception):
    """Raised by ``BlockManager.allocate`` when the pool cannot hold what was asked."""


@dataclass(frozen=True)
class BlockStatistics:
    total: int
    free: int  # free or cached (allocatable)
    cached: int  # reusable by prefix caching (part of ``free``)
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int  # of those, found in cached or held blocks


class BlockManager:
    """The pool's ``num_blocks`` blocks of ``block_size`` tokens (ids 0..num_blocks-1)."""

    def __init__(
        self, num_blocks: int, block_size: int, *, prefix_caching: bool = True, image_token_id: int | None = None
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.image_token_id = image_token_id
        self._free: collections.deque[int] = collections.deque(range(num_blocks))
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU: oldest first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block -> hash
        self._block_of: dict[int, int] = {}  # hash -> block
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- questions ---------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take now (free ones and cached ones, which it evicts)."""
        return len(self._free) + len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def statistics(self) -> BlockStatistics:
        return BlockStatistics(self.num_blocks, self.num_free, len(self._cached), self.prefix_queries, self.prefix_hits)

    def all_free(self) -> bool:
        """True when no sequence holds a block (cached blocks count as free)."""
        return self.num_free == self.num_blocks and not any(self._refs)

    # -- allocation ----------------------------------------------------------------------

    def start(self, seq: Sequence) -> None:
        """Give a sequence that holds no blocks its cached prefix: the longest run of
        cached blocks matching its tokens, taken read-only, leaving at least one token to
        compute (its last one, which yields the next token's logits). Sets
        ``seq.num_computed_tokens`` to the tokens found and counts the query."""
        assert not seq.block_table, "start() is for a sequence without blocks"
        seq.num_computed_tokens = seq.num_registered = 0
        if seq.block_hashes is None:
            seq.block_hashes = []
            seq.hash_limit = self._hash_limit(seq)
        if not self.prefix_caching:
            return
        tokens = seq.prompt.token_ids + seq.output_ids
        usable = (len(tokens) - 1) // self.block_size  # full blocks before the last token
        self._extend_hashes(seq, tokens, usable)
        found = []
        for h in seq.block_hashes[:usable]:
            block = self._block_of.get(h)
            if block is None:
                break
            found.append(block)
        for block in found:
            self._take(block)
        seq.block_table = found
        seq.num_registered = len(found)
        seq.num_computed_tokens = len(found) * self.block_size

    def count_query(self, seq: Sequence) -> None:
        """Count a started sequence's prefix lookup: its tokens queried, those found."""
        if self.prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Make ``seq``'s blocks cover its first ``num_tokens`` tokens, or raise
        ``NoFreeBlocks`` and change nothing."""
        needed = self.blocks_for(num_tokens) - len(seq.block_table)
        if needed <= 0:
            return
        if needed > self.num_free:
            raise NoFreeBlocks(f"{needed} blocks needed, {self.num_free} free")
        for _ in range(needed):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._cached.popitem(last=False)  # evict the least recently freed
                del self._block_of[self._hash_of.pop(block)]
            self._refs[block] = 1
            seq.block_table.append(block)

    def allocate_all(self, wants: list[tuple[Sequence, int]]) -> bool:
        """``allocate`` each ``(seq, num_tokens)`` if all fit together; else change nothing
        and return False."""
        needed = sum(max(0, self.blocks_for(n) - len(seq.block_table)) for seq, n in wants)
        if needed > self.num_free:
            return False
        for seq, n in wants:
            self.allocate(seq, n)
        return True

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free

    def free(self, seq: Sequence) -> None:
        """Give back every block of ``seq`` (idempotent). Hashed blocks stay cached, the
        sequence's last blocks first in line for eviction."""
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_registered = 0

    def computed(self, seq: Sequence, num_tokens: int) -> None:
        """``num_tokens`` more tokens of ``seq`` were written to its blocks: advance its
        count and make its newly full blocks reusable (prefix caching)."""
        seq.num_computed_tokens += num_tokens
        if not self.prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if len(seq.block_hashes) < full:
            self._extend_hashes(seq, seq.prompt.token_ids + seq.output_ids, full)
        for i in range(seq.num_registered, min(full, len(seq.block_hashes))):
            h = seq.block_hashes[i]
            block = seq.block_table[i]
            if h not in self._block_of and block not in self._hash_of:
                self._block_of[h] = block
                self._hash_of[block] = h
            seq.num_registered = i + 1

    # -- internals -------------------------------------------------------------------------

    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._cached[block]
        self._refs[block] += 1

    def _hash_limit(self, seq: Sequence) -> int:
        """Blocks of ``seq`` that may be hashed: all, unless an image has no content key
        (then those before the block holding the first image token)."""
        images = seq.prompt.images
        if not images:
            return 1 << 62
        first = self._first_image_token(seq)
        if all(isinstance(img, ImageInput) for img in images):
            seq.image_keys = (first // self.block_size, tuple(img.key for img in images))
            return 1 << 62
        return first // self.block_size

    def _first_image_token(self, seq: Sequence) -> int:
        ids = seq.prompt.token_ids
        if self.image_token_id is not None:
            try:
                return ids.index(self.image_token_id)
            except ValueError:
                pass
        return 0  # unknown placement: key (or refuse) every block

    def _extend_hashes(self, seq: Sequence, tokens: list[int], num_blocks: int) -> None:
        bs = self.block_size
        num_blocks = min(num_blocks, seq.hash_limit, len(tokens) // bs)
        image_block, image_keys = seq.image_keys or (-1, ())
        while len(seq.block_hashes) < num_blocks:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else None
            extra = image_keys if i == image_block else ()
            seq.block_hashes.append(hash((parent, tuple(tokens[i * bs : (i + 1) * bs]), extra)))
