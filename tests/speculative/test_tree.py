"""Tree specs, node selection, ancestor masks and the KV cache's path compaction."""

from __future__ import annotations

import pytest
import torch

from sparrow.errors import ConfigError
from sparrow.runtime.cache import StaticKVCache
from sparrow.speculative.tree import TreeSpec, ancestor_mask, select_nodes


def test_tree_spec_parses_and_validates():
    assert TreeSpec.parse("30-4-8") == TreeSpec(30, 4, 8)
    assert TreeSpec.parse(" 2-1-1 ").max_nodes == 1
    assert TreeSpec.parse("60-7-10").max_nodes == 10 + 6 * 100
    for bad in ("30-4", "a-b-c", "30_4_8", "1-1-1", "30-0-8", "30-4-0", "10-1-3"):
        with pytest.raises(ConfigError, match="--tree"):
            TreeSpec.parse(bad)


def test_select_nodes_is_closed_under_ancestry_and_depth_sorted():
    # candidates: 0,1 children of root; 2,3 children of 0; 4 child of 3 with a tie
    parents = torch.tensor([-1, -1, 0, 0, 3])
    scores = torch.tensor([-0.1, -3.0, -0.5, -0.4, -0.4])
    depths = torch.tensor([1, 1, 2, 2, 3])
    assert select_nodes(parents, scores, depths, 3).tolist() == [0, 3, 4]  # 4 beats 2
    assert select_nodes(parents, scores, depths, 4).tolist() == [0, 2, 3, 4]
    chosen = select_nodes(parents, scores, depths, 5).tolist()
    assert chosen == [0, 1, 2, 3, 4]


def test_ancestor_mask():
    mask = ancestor_mask(torch.tensor([-1, 0, 0, 1, 3]))
    assert mask.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [True, False, True, False, False],
        [True, True, False, True, False],
        [True, True, False, True, True],
    ]


def test_cache_keep_moves_the_accepted_path_in_place():
    cache = StaticKVCache(num_layers=2, max_length=16)
    for layer_index in range(2):
        keys = torch.arange(10.0).view(1, 1, 10, 1).expand(1, 2, 10, 3).clone()
        cache.update(keys, -keys, layer_index)
    buffer = cache.layers[0].key_buffer
    cache.keep(start=4, offsets=torch.tensor([0, 2, 5]))
    assert cache.length == 7
    for layer in cache.layers:
        assert layer.keys[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 6, 9]
        assert layer.values[0, 1, :, 0].tolist() == [0, -1, -2, -3, -4, -6, -9]
    assert cache.layers[0].key_buffer is buffer  # no reallocation
    cache.update(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), 0)
    cache.update(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), 1)
    cache.keep(start=7, offsets=torch.tensor([0, 1]))  # a prefix of the new part: no copy
    assert cache.length == 9
    cache.truncate(3)
    assert cache.length == 3 and cache.get_seq_length() == 3


def test_cache_overflow_is_an_error():
    cache = StaticKVCache(num_layers=1, max_length=4)
    with pytest.raises(RuntimeError, match="overflow"):
        cache.update(torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2), 0)
