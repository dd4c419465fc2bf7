"""Sliding-window KV blocks: blocks every future query's window has passed go back to the pool, once."""
from aphrodite.config import layer_sliding_windows
from aphrodite.engine.kv_cache import KVCacheManager
from aphrodite.engine.request import Request
from aphrodite.sampling_params import SamplingParams


def make(tokens, rid="r"):
    return Request(rid, list(tokens), SamplingParams(), 0, ())


def test_blocks_before_the_window_are_freed_and_released_once():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False, sliding_window=6)
    r = make(range(20))
    assert kv.allocate(r, 12)               # chunk 1: tokens 0..11, nothing computed yet
    assert kv.num_free_blocks == 7
    r.num_computed_tokens = 12
    # The next query (position 12) sees keys 7..12: blocks 0 (0-3) is passed, block 1 (4-7) is not.
    assert kv.allocate(r, 8)
    assert len(r.block_ids) == 5 and kv.num_free_blocks == 10 - 5 + 1
    r.num_computed_tokens = 20
    # Position 20 sees 15..20: blocks 0-2 (tokens 0-11) are passed.
    assert kv.allocate(r, 1)
    assert len(r.block_ids) == 6 and kv.num_free_blocks == 10 - 6 + 3
    kv.free(r)
    assert kv.num_free_blocks == 10 and not kv.window_freed


def test_freed_window_blocks_make_room_for_others():
    """With 4 blocks, a long sequence keeps going without preemption: it never holds more than its window."""
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False, sliding_window=5)
    r = make(range(4))
    assert kv.allocate(r, 4)
    r.num_computed_tokens = 4
    for _ in range(40):                     # decode 40 tokens
        r.append_token(7)
        assert kv.allocate(r, 1)
        r.num_computed_tokens += 1
    held = len(r.block_ids) - kv.window_freed[r.request_id]
    assert held <= 3 and kv.num_free_blocks == 4 - held
    other = make(range(100, 104), "o")
    assert kv.allocate(other, 4)


def test_decode_inside_the_window_takes_the_fast_path(monkeypatch):
    """A decode step with nothing to take, name or give back skips the general path (windowed requests took
    it on every step: ~5x a full-attention request's host time per step); one that passes a block does not."""
    for window, general_path in ((9, False), (3, True)):
        kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False, sliding_window=window)
        r = make(range(7))
        assert kv.allocate(r, 7)                  # blocks 0 and 1, room for tokens 0..7
        r.num_computed_tokens = 7
        r.append_token(7)
        calls = []
        monkeypatch.setattr(kv, "blocks_needed", lambda *a, calls=calls: calls.append(a) or 0)
        assert kv.allocate(r, 1)                  # token 7 fits block 1
        # position 7 sees keys after 7 - window: with window 3, block 0 (keys 0..3) has left every window
        assert bool(calls) == general_path
        assert kv.num_free_blocks == 10 - 2 + general_path and kv.window_freed.get("r", 0) == general_path


def test_windows_per_layer_from_hf_configs():
    from transformers import Gemma2Config, MistralConfig, Qwen2Config
    assert layer_sliding_windows(MistralConfig(num_hidden_layers=3, sliding_window=64)) == [64] * 3
    gemma = Gemma2Config(num_hidden_layers=4, sliding_window=64)
    assert layer_sliding_windows(gemma) == [64, None, 64, None]
    qwen = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=64, max_window_layers=2)
    assert layer_sliding_windows(qwen) == [None, None, 64, 64]
    assert layer_sliding_windows(Qwen2Config(num_hidden_layers=2)) == [None, None]
