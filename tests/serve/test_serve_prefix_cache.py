"""The server's video prefix cache: least recently used entries go first, within a byte bound."""

from __future__ import annotations

import torch

from sparrow.serve.prefix_cache import PrefixCache
from sparrow.targets.base import PrefixState


def _state(length: int) -> PrefixState:
    return PrefixState(
        input_ids=torch.arange(length),
        keys=[torch.zeros(1, 1, length, 4)],
        values=[torch.zeros(1, 1, length, 4)],
        hidden=torch.zeros(length, 4),
        visual_mask=torch.zeros(length, dtype=torch.bool),
        position_offset=0,
    )


def test_lru_eviction_within_the_byte_bound():
    one = _state(10).nbytes()
    cache = PrefixCache(max_bytes=int(2.5 * one))
    cache.put("a", _state(10))
    cache.put("b", _state(10))
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("c", _state(10))  # over the bound: "b", the least recently used, goes
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.nbytes <= cache.max_bytes and len(cache) == 2
    assert cache.stats.evictions == 1 and cache.stats.misses == 1 and cache.stats.hits == 3


def test_an_entry_larger_than_the_budget_is_not_kept_and_replacing_a_key_works():
    cache = PrefixCache(max_bytes=_state(10).nbytes())
    cache.put("big", _state(11))
    assert len(cache) == 0
    cache.put("k", _state(5))
    cache.put("k", _state(10))
    assert len(cache) == 1 and cache.get("k").input_ids.shape[0] == 10


def test_common_length_leaves_the_last_prompt_token_to_run():
    state = _state(10)
    assert state.common_length(torch.arange(10)) == 9  # same prompt: all but the last
    assert state.common_length(torch.arange(20)) == 10  # longer prompt: the whole state
    assert state.common_length(torch.tensor([0, 1, 2, 99, 4])) == 3
    assert state.common_length(torch.tensor([5])) == 0
