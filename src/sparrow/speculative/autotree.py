"""`--tree auto`: the tree that decodes fastest here, at this length, with this draft.

    speed(tree) = expected tokens per target call / (verify(total_tokens) + draft(tree))

Expected tokens per call come from the draft's acceptance profile (`DraftConfig.acceptance`,
measured on held-out data when it was trained: p[d][r], the probability that the target's
token at depth d + 1 is the draft's (r + 1)-th choice there). A tree of total-depth-top_k is
valued as the best static tree within it: the total - 1 nodes (rank < top_k, depth <= depth)
of highest path probability, 1 + their sum the expected tokens per call (the bonus token
included). The dynamic EAGLE-2 tree the loop drafts does at least as well on average; the
estimate only has to rank trees.

Costs are measured on this machine, for this target and draft, at the cache length of the
request (rounded to a power of two), and cached in $SPARROW_HOME/costs/: the target's verify
of q tokens over a cache of that length (random keys and values: the cost does not depend on
them) and one draft level of b rows over the draft's own cache: a short text cache in sparrow
mode, a cache of the request's length in eagle mode (that draft sees every position).
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import math
import os
import time
from pathlib import Path

import torch

from sparrow.home import cache_home
from sparrow.machine import cpu_name
from sparrow.runtime import native
from sparrow.runtime.attention import TreeMask
from sparrow.runtime.cache import StaticKVCache
from sparrow.speculative.tree import TreeSpec

VERIFY_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48)
DRAFT_ROWS = (1, 2, 3, 4, 6, 8, 10)
MAX_TOTAL = max(VERIFY_SIZES)
FALLBACK = TreeSpec(2, 1, 1)  # a draft without a profile: one token a round, the cheapest bet


def expected_tokens(profile: list[list[float]], spec: TreeSpec) -> float:
    """Expected tokens per target call of the best static tree within `spec` (module doc)."""
    depth = min(spec.depth, len(profile))
    if depth == 0:
        return 1.0
    heap = [(-profile[0][r], 1, r) for r in range(min(spec.top_k, len(profile[0])))]
    heapq.heapify(heap)
    total, chosen = 1.0, 0
    while heap and chosen < spec.total_tokens - 1:
        negative, d, _ = heapq.heappop(heap)
        p = -negative
        total += p
        chosen += 1
        if d < depth:  # children: deeper by one, every rank below top_k
            for r in range(min(spec.top_k, len(profile[d]))):
                heapq.heappush(heap, (-(p * profile[d][r]), d + 1, r))
    return total


def _bucket(length: int) -> int:
    return 2 ** max(8, round(math.log2(max(1, length))))


def _cache_file(target, draft, mode: str) -> Path:
    key = json.dumps([target.name, str(target.dtype), str(target.device), cpu_name(),
                      native.fingerprint() if target.device.type == "cpu" else "",
                      torch.get_num_threads(), draft.config.hidden_size,
                      draft.config.draft_vocab_size or target.vocab_size, mode])
    name = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return cache_home() / "costs" / f"{name}.json"


def _median_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def _random_cache(layers: int, length: int, capacity: int, heads: int, dim: int, target) -> StaticKVCache:
    """A cache of `length` random positions on `target`'s device and dtype (a step's cost
    does not depend on the values)."""
    cache = StaticKVCache(layers, capacity)
    for layer in cache.layers:
        kv = torch.randn(1, heads, length, dim, device=target.device, dtype=target.dtype)
        layer.lazy_initialization(kv, kv)
        layer.update(kv, kv)
    return cache


def measure_costs(target, draft, length: int, mode: str = "sparrow") -> dict:
    """Seconds of a verify of q tokens over a `length` cache, and of a draft level of b rows
    (its decoder layer and head, over a short text cache in sparrow mode or a `length` cache
    in eagle mode), on this machine."""
    from sparrow.speculative.proposers import DraftProposer

    saved = target.cache, target.position_offset
    text = target.text_config
    heads = text.num_key_value_heads
    dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache = _random_cache(target.num_layers, length, length + MAX_TOTAL, heads, dim, target)
    target.cache, target.position_offset = cache, 0
    verify = {}
    try:
        for q in VERIFY_SIZES:
            tokens = torch.randint(0, target.vocab_size, (q,))
            mask = torch.ones(q, q, dtype=torch.bool).tril()

            def step(tokens=tokens, mask=mask, q=q):
                target.forward(tokens, torch.arange(q), mask)
                target.truncate(length)
            verify[q] = _median_time(step)
    finally:
        target.cache, target.position_offset = saved
    del cache
    proposer = DraftProposer(draft, target, TreeSpec(2, 1, 1))
    config = draft.config
    d = config.hidden_size
    context = length if mode == "eagle" else 256
    draft_cache = _random_cache(1, context, context + 16, config.num_key_value_heads, config.head_dim, target)
    rows = {}
    for b in DRAFT_ROWS:
        x = torch.randn(1, b, d, device=target.device, dtype=target.dtype)
        mask = TreeMask(torch.ones(b, b, dtype=torch.bool).tril(), context + b, target.dtype)

        def level(x=x, mask=mask, b=b):
            out = draft(x, x, torch.full((1, b), context), draft_cache, mask)
            proposer._top(out[0], min(b, 8))
            draft_cache.truncate(context)
        rows[b] = _median_time(level)
    return {"length": length, "verify_s": verify, "draft_level_s": rows}


def costs_for(target, draft, length: int, mode: str = "sparrow") -> dict:
    """The measured costs at `length`'s bucket for a draft run in `mode`, from the cache file
    or measured now."""
    bucket = _bucket(length)
    path = _cache_file(target, draft, mode)
    table = json.loads(path.read_text()) if path.is_file() else {}
    if str(bucket) not in table:
        table[str(bucket)] = measure_costs(target, draft, bucket, mode)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.partial")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
    entry = table[str(bucket)]
    return {"verify_s": {int(k): v for k, v in entry["verify_s"].items()},
            "draft_level_s": {int(k): v for k, v in entry["draft_level_s"].items()}}


def _interpolate(table: dict[int, float], x: int) -> float:
    keys = sorted(table)
    if x <= keys[0]:
        return table[keys[0]]
    for a, b in zip(keys, keys[1:], strict=False):
        if x <= b:
            return table[a] + (table[b] - table[a]) * (x - a) / (b - a)
    return table[keys[-1]] * x / keys[-1]


def round_seconds(spec: TreeSpec, costs: dict) -> float:
    """Seconds of one round: drafting `spec` (a level of 1 row, then depth - 1 levels of top_k
    rows) and verifying its total_tokens."""
    draft = _interpolate(costs["draft_level_s"], 1)
    draft += (spec.depth - 1) * _interpolate(costs["draft_level_s"], spec.top_k)
    return draft + _interpolate(costs["verify_s"], spec.total_tokens)


def candidates() -> list[TreeSpec]:
    specs = []
    for depth in range(1, 9):
        for top_k in range(1, 11):
            for total in (*range(2, 13), 16, 20, 24, 32, 48):
                spec = TreeSpec(total, depth, top_k)
                if total - 1 <= spec.max_nodes and total - 1 >= depth:
                    specs.append(spec)
    return specs


def choose_tree(profile: list[list[float]] | None, costs: dict, decode_s: float | None = None
                ) -> tuple[TreeSpec, float]:
    """The candidate tree of highest expected speed, and that speed relative to plain decoding
    (tokens per second over a decode step's; `decode_s` default: a verify of 1). A pure
    function of its arguments, computed once per distinct input (it scores ~1,000 trees:
    tens of ms, which every request at a seen length would otherwise pay)."""
    if not profile:
        return FALLBACK, 1.0
    return _best(tuple(map(tuple, profile)), tuple(sorted(costs["verify_s"].items())),
                 tuple(sorted(costs["draft_level_s"].items())), decode_s)


@functools.lru_cache(maxsize=256)
def _best(profile: tuple, verify: tuple, draft: tuple, decode_s: float | None) -> tuple[TreeSpec, float]:
    costs = {"verify_s": dict(verify), "draft_level_s": dict(draft)}
    profile = [list(row) for row in profile]
    decode_s = decode_s or costs["verify_s"][1]
    best, best_speed = FALLBACK, 0.0
    for spec in candidates():
        speed = expected_tokens(profile, spec) / round_seconds(spec, costs)
        if speed > best_speed:
            best, best_speed = spec, speed
    return best, best_speed * decode_s
