"""Block pool and prefix cache behaviour, checked against hand-counted expectations."""
import pytest

from aphrodite.engine.kv_cache import KVCacheManager
from aphrodite.engine.request import Request
from aphrodite.sampling_params import SamplingParams


def make(tokens, rid="r"):
    return Request(rid, list(tokens), SamplingParams(), 0, ())


def test_allocate_counts_blocks_and_frees():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    r = make(range(10))
    assert kv.allocate(r, 10)
    assert len(r.block_ids) == 3 and kv.num_free_blocks == 7
    r.num_computed_tokens = 10
    assert kv.allocate(r, 2)                # 12 tokens still fit in 3 blocks
    assert len(r.block_ids) == 3
    r.num_computed_tokens = 12
    assert kv.allocate(r, 1)
    assert len(r.block_ids) == 4
    kv.free(r)
    assert kv.num_free_blocks == 10 and r.block_ids == []


def test_allocation_fails_without_side_effects():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = make(range(12))
    assert not kv.allocate(r, 12)
    assert r.block_ids == [] and kv.num_free_blocks == 2


def test_prefix_hit_shares_blocks_and_leaves_one_token():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make(list(range(100, 113)), "a")         # 13 tokens: 3 full blocks
    assert kv.allocate(a, 13)
    b = make(list(range(100, 112)) + [7, 8], "b")  # shares the first 3 blocks
    hits = kv.find_cached_prefix(b)
    assert hits == a.block_ids[:3]
    assert kv.allocate(b, b.num_tokens - 12, hits)
    assert [kv.ref_counts[x] for x in hits] == [2, 2, 2]
    # A prompt that is exactly cached keeps its last block to compute at least one token.
    c = make(list(range(100, 112)), "c")
    assert len(kv.find_cached_prefix(c)) == 2


def test_freed_blocks_stay_cached_until_reused_lru():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make([1, 2, 3, 4, 5], "a")
    kv.allocate(a, 5)
    kv.free(a)
    assert kv.num_free_blocks == 4
    b = make([1, 2, 3, 4, 9], "b")
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 2
    assert kv.allocate(b, 1, hits)
    assert kv.prefix_hits == 2
    kv.free(b)
    # Filling the pool with unrelated tokens evicts the old prefix.
    c = make(list(range(50, 58)), "c")
    assert kv.allocate(c, 8)
    kv.free(c)
    assert kv.find_cached_prefix(make([1, 2, 3, 4, 9], "d")) == []


def test_different_prefix_same_block_content_is_not_shared():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = make([1, 2, 3, 4, 0], "a")
    kv.allocate(a, 5)
    b = make([9, 9, 3, 4, 0], "b")    # second block equal, first differs: chained hash differs
    assert kv.find_cached_prefix(b) == []


@pytest.mark.parametrize("caching", [True, False])
def test_no_cache_mode(caching):
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=caching)
    a = make([1, 2, 3, 4, 5], "a")
    kv.allocate(a, 5)
    assert bool(kv.find_cached_prefix(make([1, 2, 3, 4, 6], "b"))) == caching
