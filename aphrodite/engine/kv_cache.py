"""The KV cache block pool: allocation, ref counts, and prefix caching.

Blocks are fixed-size pages of the per-layer KV tensors. A full block is named by a hash
chained over every token before and in it, so equal prefixes map to equal hashes. Freed
blocks keep their hash and stay findable until they are reused (least recently freed
first), which is what makes the prefix cache survive requests that come and go.

With a sliding window on every layer (Mistral, Phi-3), a block whose tokens all lie before the
window of the next token to compute is never read again: it goes back to the pool at once. Its id
stays in ``request.block_ids`` (positions keep their index, and the worker's copy of the table is
only ever appended to), but attention never reads a slot before the window, so the block may hold
another request's tokens by then.
"""
from __future__ import annotations

from collections import OrderedDict

from aphrodite.engine.request import Request


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None) -> None:
        if num_blocks < 1:
            raise ValueError("The KV cache has no room for a single block; give it more memory.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # Blocks nobody holds, oldest-freed first: the eviction order.
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}    # hash -> block id
        self.prefix_hits = 0                # blocks reused from the prefix cache (a counter for tests/metrics)
        self.sliding_window = sliding_window or None
        # request id -> how many of its leading blocks went back to the pool (outside the window)
        self.window_freed: dict[str, int] = {}

    # ---- queries ----------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = request.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(request.block_ids))

    def _update_hashes(self, request: Request, upto_tokens: int) -> None:
        """Extend ``request.block_hashes`` over its full blocks within the first ``upto_tokens`` tokens."""
        bs = self.block_size
        toks = request.all_token_ids
        hashes = request.block_hashes
        # A LoRA adapter changes every block's keys and values: its id seeds the chain.
        first = ("lora", request.lora_int_id) if request.lora_int_id else None
        for i in range(len(hashes), upto_tokens // bs):
            parent = hashes[-1] if hashes else first
            hashes.append(chain_hash(parent, tuple(toks[i * bs:(i + 1) * bs])))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks of the longest cached prefix; at least one token is always left to compute."""
        if not self.enable_prefix_caching:
            return []
        self._update_hashes(request, request.num_tokens - 1)
        hits: list[int] = []
        for h in request.block_hashes:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    # ---- allocation -------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Give ``request`` room for ``num_new_tokens`` more tokens; False (and no change) if full."""
        if not cached_blocks and not (self.sliding_window and self._window_passed(request)):
            # The common decode step: the tokens fit in the blocks held and no block fills up, so there
            # is nothing to take or to name (what the general path below would conclude, cheaply); with a
            # sliding window, also no block to give back yet.
            total = request.num_computed_tokens + num_new_tokens
            if total <= len(request.block_ids) * self.block_size and (
                    not self.enable_prefix_caching
                    or min(total, len(request.all_token_ids)) // self.block_size <= request.num_named_blocks):
                return True
        if self.sliding_window:   # room first: blocks the window has passed cost no eviction
            self._free_outside_window(request)
        for b in cached_blocks:
            if self.ref_counts[b] == 0:
                # Reviving a free cached block takes it out of the free pool.
                self.free_blocks.pop(b)
            self.ref_counts[b] += 1
        request.block_ids.extend(cached_blocks)
        self.prefix_hits += len(cached_blocks)
        needed = self.blocks_needed(request, num_new_tokens)
        if needed > self.num_free_blocks:
            if cached_blocks:
                self._release(cached_blocks)
                del request.block_ids[-len(cached_blocks):]
                self.prefix_hits -= len(cached_blocks)
            return False
        for _ in range(needed):
            request.block_ids.append(self._take_free_block())
        if self.enable_prefix_caching:
            # Only blocks of known tokens get a name: a pending (async) token is not hashable yet;
            # its block is named by a later allocate.
            self._register_full_blocks(request, min(request.num_computed_tokens + num_new_tokens,
                                                    request.num_tokens))
        if self.sliding_window:
            self._free_outside_window(request)
        return True

    def _window_span(self, request: Request) -> tuple[int, int]:
        """(leading blocks already given back, leading blocks every future query's window has passed): the
        next token to compute sits at ``num_computed_tokens`` and sees keys after ``num_computed_tokens - window``."""
        first_needed = request.num_computed_tokens - self.sliding_window + 1
        done = self.window_freed.get(request.request_id, 0)
        return done, min(max(first_needed, 0) // self.block_size, len(request.block_ids))

    def _window_passed(self, request: Request) -> bool:
        """Whether ``_free_outside_window`` has a block to give back."""
        done, upto = self._window_span(request)
        return upto > done

    def _free_outside_window(self, request: Request) -> None:
        """Release the blocks every future query's window has passed."""
        done, upto = self._window_span(request)
        if upto > done:
            self._release(request.block_ids[done:upto])
            self.window_freed[request.request_id] = upto

    def _take_free_block(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:
            if self.cached.get(h) == block:
                del self.cached[h]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def _register_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Name the blocks that will be full after this step so later requests can share them."""
        self._update_hashes(request, num_tokens)
        hashes = request.block_hashes
        for i in range(request.num_named_blocks, num_tokens // self.block_size):
            block = request.block_ids[i]
            if self.block_hash[block] is None:
                self.block_hash[block] = hashes[i]
                self.cached.setdefault(hashes[i], block)
        request.num_named_blocks = max(request.num_named_blocks, num_tokens // self.block_size)

    def free(self, request: Request) -> None:
        """Release a request's blocks; the tail goes first in eviction order (least likely shared)."""
        done = self.window_freed.pop(request.request_id, 0)
        self._release(reversed(request.block_ids[done:]))
        request.block_ids = []
        request.num_named_blocks = 0

    def _release(self, blocks) -> None:
        for b in blocks:
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_blocks[b] = None
