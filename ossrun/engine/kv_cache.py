"""Paged KV cache bookkeeping: block pools, per-sequence block tables, prefix hashing, window release.

No tensors here: blocks are integers. The runner owns the memory; this module decides which block
ids a sequence's tokens live in. gpt-oss has two kinds of layers, so there are two pools:
`full` (odd layers: every token kept) and `sliding` (even layers: only the last 128 tokens are
ever read, so older blocks go back to the pool and a sequence's sliding memory stays bounded).

Prefix caching: a block that is full gets a hash chained from its predecessor's (so equal hashes
mean equal whole prefixes, not only equal blocks). The hash is a keyed 128-bit BLAKE2b whose key is drawn per
process: a client who could make its block collide with another's prefix would have that request read its KV (a
wrong answer, silently), and Python's `hash` of a tuple of ints is 64 bits, unkeyed and the same in every process,
so such a block could be searched for offline (vLLM's CVE-2025-25183 was this). Freed hashed blocks stay findable until the
pool needs them again (least recently freed first), so a repeated prefix is not recomputed.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

NULL_BLOCK = 0  # never handed out; stands for "not held" in tables


class BlockPool:
    """Fixed set of block ids with reference counts, a hash index and an LRU of free blocks."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError("a block pool needs at least 2 blocks (block 0 is the null block)")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}
        # Free blocks in eviction order (oldest first); hashed ones are still reusable as cache.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def capacity(self) -> int:
        """Blocks a sequence can ever hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_used(self) -> int:
        return self.capacity - len(self.free)

    def allocate(self) -> int:
        """A fresh block (evicting the least recently freed cached one); IndexError when none is free."""
        if not self.free:
            raise IndexError("no free KV blocks")
        block, _ = self.free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:
            self.block_hash[block] = None
            if self.by_hash.get(old) == block:
                del self.by_hash[old]
        self.ref_counts[block] = 1
        return block

    def lookup(self, block_hash: int) -> int | None:
        return self.by_hash.get(block_hash)

    def acquire(self, block: int) -> None:
        """Take a reference to a cached block (a prefix hit)."""
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free[block] = None

    def register(self, block: int, block_hash: int) -> bool:
        """Make a full block findable by its prefix hash (first writer wins) → whether this call did."""
        if self.block_hash[block] is None and block_hash not in self.by_hash:
            self.block_hash[block] = block_hash
            self.by_hash[block_hash] = block
            return True
        return False


_HASH_KEY = os.urandom(32)  # per process: block hashes are never stored, and nobody outside can predict them


def chain_hash(parent: int | None, tokens: tuple[int, ...], salt: str | None) -> int:
    """Hash of a whole prefix ending in `tokens`; `salt` (the LoRA adapter version) keeps different weights apart.
    Each part is written with its length or a fixed width, so no two different (parent, tokens, salt) read the same."""
    digest = hashlib.blake2b(key=_HASH_KEY, digest_size=16)
    digest.update(b"\x00" * 17 if parent is None else b"\x01" + parent.to_bytes(16, "little"))
    digest.update(len(tokens).to_bytes(4, "little") + array("q", tokens).tobytes())
    digest.update(b"" if salt is None else b"\x01" + salt.encode())
    return int.from_bytes(digest.digest(), "little")


@dataclass(slots=True)
class SequenceBlocks:
    """One sequence's block tables (logical block i → physical id) and its prefix hashes."""

    full: list[int] = field(default_factory=list)
    sliding: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # of its full blocks, in order
    sliding_released: int = 0  # sliding logical blocks below this index are given back


class KVCacheManager:
    def __init__(self, num_full_blocks: int, num_sliding_blocks: int, block_size: int, window: int, prefix_caching: bool = True):
        self.block_size = block_size
        self.window = window
        self.prefix_caching = prefix_caching
        self.full = BlockPool(num_full_blocks)
        self.sliding = BlockPool(num_sliding_blocks)

    # -- prefix cache -------------------------------------------------------------------------
    def prefix_hashes(self, tokens: list[int], salt: str | None) -> list[int]:
        hashes, parent = [], None
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            parent = chain_hash(parent, tuple(tokens[start:start + self.block_size]), salt)
            hashes.append(parent)
        return hashes

    def match_prefix(self, blocks: SequenceBlocks, tokens: list[int], salt: str | None) -> int:
        """Attach the longest cached prefix to a sequence that holds no blocks yet → tokens it covers.

        At least the last token is always left to compute (its logits start the generation). A hit
        of n blocks needs all n in the full pool and, for the sliding layers, only the blocks the
        window still reaches from position n·block_size.
        """
        if not self.prefix_caching or blocks.full:
            return 0
        hashes = self.prefix_hashes(tokens[: len(tokens) - 1], salt)
        n = 0
        while n < len(hashes) and self.full.lookup(hashes[n]) is not None:
            n += 1
        while n > 0:
            first = self._first_sliding_block(n * self.block_size)
            if all(self.sliding.lookup(h) is not None for h in hashes[first:n]):
                break
            n -= 1
        if n == 0:
            return 0
        first = self._first_sliding_block(n * self.block_size)
        for i, h in enumerate(hashes[:n]):
            block = self.full.lookup(h)
            self.full.acquire(block)
            blocks.full.append(block)
            if i >= first:
                block = self.sliding.lookup(h)
                self.sliding.acquire(block)
                blocks.sliding.append(block)
            else:
                blocks.sliding.append(NULL_BLOCK)
        blocks.sliding_released = first
        blocks.hashes = hashes[:n]
        return n * self.block_size

    def _first_sliding_block(self, next_position: int) -> int:
        """The lowest logical block a query at `next_position` or later can still read."""
        return max(0, next_position - self.window + 1) // self.block_size

    # -- growth and release -------------------------------------------------------------------
    def blocks_needed(self, blocks: SequenceBlocks, num_tokens: int) -> int:
        have = len(blocks.full)
        want = -(-num_tokens // self.block_size)
        return max(0, want - have)

    def fits_alone(self, num_tokens: int) -> bool:
        """Whether one sequence of `num_tokens` fits the full-attention pool with every other block freed (the
        sliding pool holds any one sequence: a window's worth a sequence is planned)."""
        return -(-num_tokens // self.block_size) <= self.full.capacity

    def can_allocate(self, blocks: SequenceBlocks, num_tokens: int) -> bool:
        n = self.blocks_needed(blocks, num_tokens)
        return n <= self.full.num_free and n <= self.sliding.num_free

    def allocate(self, blocks: SequenceBlocks, num_tokens: int) -> bool:
        """Grow the tables to hold `num_tokens` tokens; False (and nothing changed) if the pools are short."""
        if not self.can_allocate(blocks, num_tokens):
            return False
        for _ in range(self.blocks_needed(blocks, num_tokens)):
            blocks.full.append(self.full.allocate())
            blocks.sliding.append(self.sliding.allocate())
        return True

    def commit(self, blocks: SequenceBlocks, tokens: list[int], num_computed: int, salt: str | None,
               num_prompt_tokens: int = 0) -> int:
        """After a step: hash newly full blocks, and give back sliding blocks the window has passed
        → how many of the first `num_prompt_tokens` tokens this call made findable in the prefix cache
        (OpenAI's `cache_write_tokens`: a block another sequence indexed first was not written by this one)."""
        written = 0
        if self.prefix_caching:
            while (len(blocks.hashes) + 1) * self.block_size <= num_computed:
                i = len(blocks.hashes)
                parent = blocks.hashes[-1] if blocks.hashes else None
                h = chain_hash(parent, tuple(tokens[i * self.block_size:(i + 1) * self.block_size]), salt)
                blocks.hashes.append(h)
                if self.full.register(blocks.full[i], h) and (i + 1) * self.block_size <= num_prompt_tokens:
                    written += self.block_size
                if blocks.sliding[i] != NULL_BLOCK:
                    self.sliding.register(blocks.sliding[i], h)
        first = self._first_sliding_block(num_computed)
        while blocks.sliding_released < min(first, len(blocks.sliding)):
            i = blocks.sliding_released
            if blocks.sliding[i] != NULL_BLOCK:
                self.sliding.release(blocks.sliding[i])
                blocks.sliding[i] = NULL_BLOCK
            blocks.sliding_released += 1
        return written

    def free(self, blocks: SequenceBlocks) -> None:
        """Give back everything; tail blocks first so the LRU evicts a prefix's end before its start."""
        for block in reversed(blocks.full):
            self.full.release(block)
        for block in reversed(blocks.sliding):
            if block != NULL_BLOCK:
                self.sliding.release(block)
        blocks.full.clear()
        blocks.sliding.clear()
        blocks.hashes.clear()
        blocks.sliding_released = 0

    def sliding_held(self, blocks: SequenceBlocks) -> int:
        return sum(1 for b in blocks.sliding if b != NULL_BLOCK)
