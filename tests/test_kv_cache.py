"""Block bookkeeping with exact block ids and reference counts on tiny pools (no model, no tensors)."""

import os
import subprocess
import sys

import pytest

from ossrun.engine.kv_cache import NULL_BLOCK, BlockPool, KVCacheManager, SequenceBlocks


def manager(full=10, sliding=10, block=4, window=8) -> KVCacheManager:
    return KVCacheManager(full, sliding, block, window)


def test_pool_hands_out_blocks_in_order_and_never_the_null_block():
    pool = BlockPool(4)
    assert [pool.allocate() for _ in range(3)] == [1, 2, 3]
    with pytest.raises(IndexError):
        pool.allocate()
    pool.release(2)
    assert pool.num_free == 1 and pool.allocate() == 2


def test_allocation_is_all_or_nothing():
    kv = manager(full=3, sliding=10)
    seq = SequenceBlocks()
    assert kv.allocate(seq, 8) and seq.full == [1, 2]
    assert not kv.allocate(seq, 13)  # 2 more full blocks needed; the pool of 3 has 2 usable, both taken
    assert seq.full == [1, 2]


def test_sliding_blocks_are_released_behind_the_window():
    kv = manager(block=4, window=8)
    seq = SequenceBlocks()
    tokens = list(range(20))
    kv.allocate(seq, 20)
    kv.commit(seq, tokens, 20, None)
    # A query at position 20 reads keys > 12, i.e. logical blocks 3 (12..15) and 4: blocks 0..2 go back.
    assert seq.sliding[:3] == [NULL_BLOCK] * 3 and all(b != NULL_BLOCK for b in seq.sliding[3:])
    assert kv.sliding.num_used == 2 and kv.full.num_used == 5


def test_prefix_hit_shares_blocks_by_reference():
    kv = manager(full=20, sliding=20, block=4, window=8)
    tokens = list(range(17))
    a = SequenceBlocks()
    kv.allocate(a, 17)
    kv.commit(a, tokens, 17, None)
    b = SequenceBlocks()
    hit = kv.match_prefix(b, tokens, None)
    assert hit == 16  # 4 full blocks; the 17th token is recomputed
    assert b.full == a.full[:4] and all(kv.full.ref_counts[x] == 2 for x in b.full)
    # Sliding: only blocks the window reaches from position 16 (keys 9..15 → blocks 2 and 3) are shared.
    assert b.sliding[:2] == [NULL_BLOCK, NULL_BLOCK] and b.sliding[2:] == a.sliding[2:4]


def test_different_adapters_do_not_share_prefixes():
    kv = manager()
    tokens = list(range(9))
    a = SequenceBlocks()
    kv.allocate(a, 9)
    kv.commit(a, tokens, 9, "adapter-1")
    assert kv.match_prefix(SequenceBlocks(), tokens, "adapter-2") == 0
    assert kv.match_prefix(SequenceBlocks(), tokens, "adapter-1") == 8


def test_freed_blocks_stay_cached_until_evicted_lru():
    kv = manager(full=4, sliding=10, block=4)
    tokens = list(range(13))
    a = SequenceBlocks()
    kv.allocate(a, 12)
    kv.commit(a, tokens, 12, None)
    kv.free(a)
    assert kv.full.num_used == 0
    assert kv.match_prefix(SequenceBlocks(), tokens, None) == 12  # still findable after free
    kv2 = manager(full=4, sliding=10, block=4)
    c = SequenceBlocks()
    kv2.allocate(c, 12)
    kv2.commit(c, tokens, 12, None)
    kv2.free(c)
    kv2.allocate(SequenceBlocks(), 4)  # evicts one cached block: the tail (freed first)
    assert kv2.match_prefix(SequenceBlocks(), tokens, None) == 8


def test_prefix_hashes_cannot_be_computed_outside_the_process():
    """Hunt round 14 B-F2: block hashes were Python's `hash((parent, tokens, salt))`: 64 bits, unkeyed for ints and the
    same in every process (PYTHONHASHSEED changes only str hashes), so a client could search offline for a block that
    collides with another user's prefix, whose requests would then read the client's KV (vLLM's CVE-2025-25183). Now a
    128-bit BLAKE2b keyed per process: the same tokens hash differently in two servers, and alike within one."""
    code = ("from ossrun.engine.kv_cache import KVCacheManager as M; "
            "print(M(8, 8, 4, 128).prefix_hashes(list(range(12)), None))")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
            for _ in range(2)]
    first, second = (eval(run) for run in runs)
    assert len(first) == 3 and first != second and not set(first) & set(second)
    manager = KVCacheManager(8, 8, 4, 128)
    again = manager.prefix_hashes(list(range(12)), None)
    assert again == manager.prefix_hashes(list(range(12)), None) and max(again).bit_length() > 64
    assert manager.prefix_hashes(list(range(12)), "adapter-v1") != again  # an adapter's KV is another prefix
