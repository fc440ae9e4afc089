"""Cost of one tree verify and one AR decode step against a long KV cache, beside the roofline.

What is timed (median over --reps after warm-up; each step is one target forward followed by a
truncate back to the cached length, so every repetition sees the same cache):

* ``decode``: one AR step (q = 1) through `sparrow.targets` (attention "sparrow").
* ``verify q``: one EAGLE-style tree of q tokens (random parents before children, depth <= 6,
  mask from `ancestor_mask`) through the same adapter.

The same steps run, on the same weights and cache contents, for comparison:

* ``sparrow+mkl``: the same engine path with torch's own CPU linears (`F.linear`, MKL)
  instead of the oneDNN-packed ones the engine uses (`sparrow.runtime.linear`);
* ``sparrow+onednn``: the same engine path with the native linear kernel on one row only
  (`native.LINEAR_MAX_ROWS = 1`, the engine before it took up to 32): every verify's linears
  on oneDNN's packed kernel;

and through transformers' own attention:

* ``sdpa+static``: attention "sdpa" over the same `StaticKVCache`, the tree given as a 4-D
  additive mask; with a mask, transformers' sdpa path calls `repeat_kv` and so copies the
  whole cache (times the GQA group count) in every layer.
* ``sdpa+dynamic``: the transformers default, attention "sdpa" over a `DynamicCache`, which
  also `torch.cat`s the whole cache in every layer on every step (rolled back with `crop`).

The target is a random ~120M-parameter Qwen2-shaped language model inside a LLaVA-OneVision
shell (tiny SigLIP tower, never run). The cache is not prefilled at 25k tokens (minutes on this
CPU): a short prompt is prefilled with enough capacity, the cache buffers are filled with random
values and their length is set (step time does not depend on cache contents).

Roofline of a step that appends q tokens to a cache of T tokens (additive: no overlap of compute
and memory traffic; the report also gives the overlapped one, max(compute, memory), the lower
bound), with L layers, H query heads, H_kv KV heads, head dim D, b bytes per element:

    FLOPs_linear = 2 * P_linear * q       P_linear: every decoder-layer linear weight + lm_head
                                          (lm_head runs on all q tokens)
    FLOPs_attn   = L * 4 * H * D * (T + q) * q          (Q K^T and P V over all T + q keys)
    bytes        = b * (P_weights_read                  every weight a step reads: the decoder
                                                        layers, final norm, lm_head, q rows of
                                                        the embedding table
                        + 2 * L * H_kv * D * T          the KV cache read
                        + 2 * L * H_kv * D * q)         the new keys/values written
                   + 4 * q * V                          fp32 logits written
    roofline     = FLOPs_linear / R_gemm(q) + FLOPs_attn / R_attn(q) + bytes / BW

All rates are measured in the same run, on the same device, with the same threads:

* R_gemm(q): GFLOP/s on the model's own linear shapes (d->d, d->kv, d->ffn, ffn->d,
  d->vocab; the vocab shape on a 4096-column slice) at M = q, weighted by how often the model
  runs each (its FLOPs over the sum of the per-shape median times), each shape with the faster
  of torch.mm (MKL on CPU) and the oneDNN-packed kernel (CPU fp32); both are recorded.
* R_attn(q): GFLOP/s of the GQA-packed attention matmuls at q, scores (G*q x D) @ (D x 1024)
  and values (G*q x 1024) @ (1024 x D), G = H / H_kv: the products a flash kernel runs on tiles
  that stay in cache. The unblocked (G*q x D) @ (D x T) is recorded too; it is slower because
  it writes the whole G*q x T score matrix to memory, traffic a fused kernel does not have.
* BW: GB/s of the fastest read of a 1 GiB tensor: torch's sum over it, and on a CPU with a
  compiler also sparrow's native row kernel over it as a (2^18 x 1024) matrix (the weight
  stream of a decode step; on this CPU it reads ~1.4x faster than the sum, so a roofline from
  the sum alone would be lenient). A copy is recorded too.

A decode step (q = 1) takes the compute rates of the smallest tree size: at M = 1 a matmul is
a memory-bound GEMV whose traffic the bytes term already charges. The "peak" roofline uses the
best R_gemm and R_attn measured at any tree size instead, so it also charges the lower BLAS
efficiency of small M (a 16-token tree runs 96-row GEMMs) to the step.

On this CPU a decode step is memory-bound (weights + cache), and the attention FLOPs of q tree
tokens over a long cache grow with q, so verify(q) / decode rises with q; the roofline says by
how much it must.

The machine may be shared: on CPU each repetition waits until other processes use under
--idle-threshold cores, records how much CPU they used while it ran, and repetitions disturbed
by more than that are repeated (up to a bound) and counted in the results.

    python benchmarks/verify_cost.py [--lengths 2048 8192 25000] [--tree-sizes 16 32 64]
        [--reps N] [--device cpu|cuda] [--dtype float32|bfloat16] [--out benchmarks/results]
        [--tag h100]

Writes <out>/verify_cost[_<tag>].json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sparrow.machine import machine_info
from sparrow.runtime import native
from sparrow.runtime.linear import available as linear_kernels_available
from sparrow.runtime.linear import pack_linears, unpack_linears
from sparrow.speculative.tree import ancestor_mask
from sparrow.targets import TargetAdapter, load_target, wrap_model

STEP_DECODE = "decode"
IMPLEMENTATIONS = ("sparrow", "sparrow+mkl", "sparrow+onednn", "sdpa+static", "sdpa+dynamic")


@dataclass(frozen=True)
class TargetShape:
    """The language model of the benchmark target (Qwen2-shaped, untied lm_head)."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    kv_heads: int = 2
    intermediate: int = 2048
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of every linear of one decoder layer, then lm_head."""
        d, kv, f = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        layer = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]
        return layer * self.layers + [(d, self.vocab)]


# ---- the target -------------------------------------------------------------------------------


def build_target(shape: TargetShape, dtype: torch.dtype, device: str) -> TargetAdapter:
    """A random LLaVA-OneVision with a Qwen2 language model of `shape`, wrapped for sparrow."""
    from transformers import AutoModelForImageTextToText, LlavaOnevisionConfig

    text = dict(
        model_type="qwen2",
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    config = LlavaOnevisionConfig(
        text_config=text, vision_config=vision, vision_feature_layer=-1,
        image_token_index=shape.vocab - 2, video_token_index=shape.vocab - 1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype).to(device).eval()
    return wrap_model(model)


def parameter_counts(adapter: TargetAdapter) -> dict[str, int]:
    language_model = adapter.model.model.language_model
    linear = sum(
        module.weight.numel()
        for module in language_model.layers.modules()
        if isinstance(module, torch.nn.Linear)
    ) + adapter.model.lm_head.weight.numel()
    tied = adapter.model.lm_head.weight is adapter.model.get_input_embeddings().weight
    return {
        "language_model": sum(p.numel() for p in language_model.parameters()),
        "lm_head": adapter.model.lm_head.weight.numel(),
        "text_total": sum(p.numel() for p in language_model.parameters())
        + (0 if tied else adapter.model.lm_head.weight.numel()),
        "linear_weights": linear,  # P_linear of the roofline
        "whole_model": sum(p.numel() for p in adapter.model.parameters()),
    }


def weight_elements_read(adapter: TargetAdapter, q: int) -> int:
    """Elements of weight a step over q tokens reads: all layers, final norm, lm_head, q embeddings."""
    language_model = adapter.model.model.language_model
    layers = sum(p.numel() for p in language_model.layers.parameters())
    norm = sum(p.numel() for p in language_model.norm.parameters())
    return layers + norm + adapter.model.lm_head.weight.numel() + q * adapter.hidden_size


def prepare_cache(adapter: TargetAdapter, capacity: int) -> None:
    """Allocate the static cache (short prefill) and fill every buffer with random values."""
    prompt = torch.arange(8)[None] + 10
    adapter.prefill(prompt, capacity=capacity)
    generator = torch.Generator(device=adapter.device).manual_seed(0)
    for layer in adapter.cache.layers:
        layer.key_buffer.normal_(generator=generator)
        layer.value_buffer.normal_(generator=generator)


def set_cache_length(adapter: TargetAdapter, length: int) -> None:
    for layer in adapter.cache.layers:
        layer.set_length(length)


def dynamic_cache_like(adapter: TargetAdapter, length: int):
    """A transformers DynamicCache holding a copy of the first `length` static-cache positions."""
    from transformers import DynamicCache

    cache = DynamicCache(config=adapter.text_config)
    for index, layer in enumerate(adapter.cache.layers):
        cache.update(layer.key_buffer[:, :, :length].clone(),
                     layer.value_buffer[:, :, :length].clone(), index)
    return cache


def random_tree(q: int, max_depth: int, generator: torch.Generator):
    """An EAGLE-like tree of q nodes: node 0 is the root, parents precede children.

    Returns (parents (q,), depths (q,), mask (q, q) bool from `ancestor_mask`). Each node picks a
    random earlier node whose depth is below `max_depth`, favouring recent (deep, high-score)
    nodes the way EAGLE-2's top-k expansion does.
    """
    parents = [-1]
    depths = [0]
    for node in range(1, q):
        candidates = [i for i in range(node) if depths[i] < max_depth]
        weights = torch.tensor([1.0 + depths[i] for i in candidates])
        parent = candidates[int(torch.multinomial(weights, 1, generator=generator))]
        parents.append(parent)
        depths.append(depths[parent] + 1)
    parents_t = torch.tensor(parents)
    return parents_t, torch.tensor(depths), ancestor_mask(parents_t)


# ---- timing on a shared machine ---------------------------------------------------------------


class CpuLoadGuard:
    """Waits for other processes to leave the CPU alone, and measures how much they used.

    Reads /proc/stat (all CPUs) minus this process' own CPU time. Disabled off Linux.
    """

    def __init__(self, threshold: float, max_wait_s: float, enabled: bool = True):
        self.threshold = threshold
        self.max_wait_s = max_wait_s
        self.enabled = enabled and Path("/proc/stat").exists()
        self.ticks = os.sysconf("SC_CLK_TCK") if self.enabled else 100
        self.waited_s = 0.0

    def _snapshot(self) -> tuple[int, int, float]:
        with open("/proc/stat") as file:
            values = [int(v) for v in file.readline().split()[1:9]]
        busy = sum(values) - values[3] - values[4]  # minus idle and iowait
        with open("/proc/self/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])  # utime + stime, all threads
        return busy, own, time.perf_counter()

    def begin(self):
        return self._snapshot() if self.enabled else None

    def others(self, start) -> float:
        """Cores used by other processes since `start` (a `begin()` snapshot)."""
        if start is None:
            return 0.0
        busy, own, now = self._snapshot()
        elapsed = max(now - start[2], 1e-9)
        return max(0.0, ((busy - start[0]) - (own - start[1])) / self.ticks / elapsed)

    def wait_idle(self, window_s: float = 0.1) -> None:
        if not self.enabled:
            return
        deadline = time.perf_counter() + self.max_wait_s
        started = time.perf_counter()
        while time.perf_counter() < deadline:
            start = self.begin()
            time.sleep(window_s)
            if self.others(start) < self.threshold:
                break
        self.waited_s += time.perf_counter() - started


@dataclass
class Timing:
    median_s: float
    times_s: list[float]  # the clean repetitions
    disturbed: int  # repetitions thrown away because other processes used the CPU
    others_cores: list[float]  # CPU used by other processes during each kept repetition


def time_step(fn: Callable[[], object], reps: int, warmup: int, guard: CpuLoadGuard,
              sync: Callable[[], None], min_rep_s: float = 0.0) -> Timing:
    """Median wall time of one call of `fn` over `reps` undisturbed repetitions.

    After `warmup` calls and a wait for an idle CPU, repetitions run back to back, as decoding
    steps do (a pause before each one let the thread pool fall asleep and cost a 2k-cache decode
    step ~25%); each times enough calls to last `min_rep_s` (one call for model steps) and
    divides. A repetition during which other processes used at least --idle-threshold cores (and
    at least 3 scheduler ticks, the resolution of /proc/stat) is redone after another wait for
    an idle CPU, up to 4 * reps attempts.
    """
    for _ in range(warmup):
        fn()
    sync()
    inner = 1
    if min_rep_s > 0:
        began = time.perf_counter()
        fn()
        sync()
        inner = max(1, int(min_rep_s / max(time.perf_counter() - began, 1e-6)))
    times, loads, disturbed = [], [], 0
    attempts = 0
    quiet = False
    while len(times) < reps and attempts < 4 * reps:
        attempts += 1
        if not quiet:
            guard.wait_idle()
            quiet = True
        start = guard.begin()
        began = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        elapsed = time.perf_counter() - began
        load = guard.others(start)
        if load >= guard.threshold and elapsed * load * guard.ticks >= 3:
            disturbed += 1
            quiet = False
            continue
        times.append(elapsed / inner)
        loads.append(round(load, 3))
    if not times:  # the machine never went quiet: report what there is, flagged
        times = [elapsed / inner]
        loads = [round(load, 3)]
    return Timing(statistics.median(times), times, disturbed, loads)


# ---- machine rates ----------------------------------------------------------------------------


def packed_mm(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x @ weight through the oneDNN-packed kernel the engine's CPU linears use
    (`sparrow.runtime.linear`): weight (in, out) becomes an `nn.Linear(in, out)` and is packed."""
    linear = torch.nn.Linear(weight.shape[0], weight.shape[1], bias=False, device=weight.device,
                             dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
    pack_linears(linear)
    return torch.no_grad()(linear)


def kernels(device: str, dtype) -> dict[str, Callable]:
    """The matmul kernels a rate is measured with: name -> (weight -> (x -> x @ weight))."""
    found = {"mkl": lambda w: (lambda x: torch.mm(x, w))}
    if device == "cpu" and dtype == torch.float32 and linear_kernels_available():
        found["onednn"] = packed_mm
    return found


def measure_gemm(shape: TargetShape, rows: list[int], dtype, device, guard, sync,
                 reps: int) -> dict:
    """GFLOP/s of the model's linear shapes at M = each of `rows`, per kernel (torch.mm, i.e.
    MKL on CPU; oneDNN-packed where the engine uses it) and with the faster kernel per shape.

    Per M, the rate of the model's mix: all FLOPs of one pass over every linear (the layers and
    lm_head) divided by the sum of the per-shape median times. lm_head is timed on a
    4096-column slice (in cache, like the other weights); its DRAM traffic is in the bytes term.
    """
    per_shape: dict[str, float] = {}
    mix: dict[str, dict[str, float]] = {"best": {}}
    counts: dict[tuple[int, int], float] = {}
    for fan_in, fan_out in shape.linear_shapes():
        key = (fan_in, min(fan_out, 4096))
        counts[key] = counts.get(key, 0) + fan_out / key[1]
    found = kernels(device, dtype)
    for m in rows:
        total_flops, total_s = 0.0, dict.fromkeys([*found, "best"], 0.0)
        for (fan_in, fan_out), count in counts.items():
            x = torch.randn(m, fan_in, dtype=dtype, device=device)
            w = torch.randn(fan_in, fan_out, dtype=dtype, device=device)
            flops = 2 * m * fan_in * fan_out
            best = float("inf")
            for name, make in found.items():
                matmul = make(w)
                timing = time_step(lambda x=x, f=matmul: f(x), reps, 2, guard, sync, 0.1)
                per_shape[f"{name}:{m}x{fan_in}x{fan_out}"] = flops / timing.median_s / 1e9
                total_s[name] += count * timing.median_s
                best = min(best, timing.median_s)
            total_flops += count * flops
            total_s["best"] += count * best
        for name, seconds in total_s.items():
            mix.setdefault(name, {})[str(m)] = total_flops / seconds / 1e9
    return {"model_mix_gflops": mix["best"], "mix_gflops_by_kernel": mix, "per_shape_gflops": per_shape}


def measure_attention_matmul(shape: TargetShape, tree_sizes: list[int], lengths: list[int],
                             dtype, device, guard, sync, reps: int, block: int = 1024) -> dict:
    """GFLOP/s of the GQA-packed attention matmuls, per tree size q.

    Blocked (used by the roofline): scores (G*q x D) @ (D x block) and values
    (G*q x block) @ (block x D), the products a flash kernel runs with its tiles in cache, each
    with the faster of the kernels (`kernels`; the block prepacked for oneDNN); or, where it is
    faster, the whole of sparrow's native tree attention over 8 blocks of keys (products,
    softmax and all: a rate some kernel reaches is a rate the roofline must allow).
    Unblocked (recorded, for each of `lengths`): (G*q x D) @ (D x T), which also writes the
    whole G*q x T score matrix to memory, traffic a fused kernel never has.
    """
    d, groups = shape.head_dim, shape.groups
    keys_block = torch.randn(d, block, dtype=dtype, device=device)
    values_block = torch.randn(block, d, dtype=dtype, device=device)
    blocked, matmuls, fused, unblocked = {}, {}, {}, {}
    found = kernels(device, dtype)
    for q in tree_sizes:
        rows = groups * q
        queries = torch.randn(rows, d, dtype=dtype, device=device)
        probs = torch.randn(rows, block, dtype=dtype, device=device)
        flops = 2 * rows * d * block
        scores_s = values_s = float("inf")
        for make in found.values():
            scores, values = make(keys_block), make(values_block)
            scores_s = min(scores_s, time_step(lambda a=queries, f=scores: f(a), reps, 2, guard,
                                               sync, 0.1).median_s)
            values_s = min(values_s, time_step(lambda p=probs, f=values: f(p), reps, 2, guard,
                                               sync, 0.1).median_s)
        blocked[str(q)] = matmuls[str(q)] = 2 * flops / (scores_s + values_s) / 1e9
        if device == "cpu" and dtype == torch.float32:
            query = torch.randn(1, shape.heads, q, d)
            keys, values = (torch.randn(1, shape.kv_heads, 8 * block, d) for _ in range(2))
            visible = torch.ones(q, q, dtype=torch.bool)
            with torch.no_grad():
                if native.tree_attention(query, keys, values, visible, 0.125) is not None:
                    timing = time_step(
                        lambda a=query, k=keys, v=values, m=visible: native.tree_attention(
                            a, k, v, m, 0.125), reps, 2, guard, sync, 0.1)
                    fused[str(q)] = 4 * shape.heads * q * 8 * block * d / timing.median_s / 1e9
                    blocked[str(q)] = max(blocked[str(q)], fused[str(q)])
        for length in lengths:
            keys_t = torch.randn(d, length, dtype=dtype, device=device)
            timing = time_step(lambda a=queries, k=keys_t: torch.mm(a, k), reps, 1, guard, sync,
                               0.1)
            unblocked[f"{q}@{length}"] = 2 * rows * d * length / timing.median_s / 1e9
    return {"block": block, "blocked_gflops": blocked, "matmul_gflops": matmuls,
            "native_gflops": fused, "unblocked_gflops": unblocked}


def measure_bandwidth(device, guard, sync, reps: int, gib: float = 1.0) -> dict:
    """GB/s of the fastest read of `gib` GiB (torch's sum; the native row kernel where it runs),
    and of a copy (read + write counted)."""
    elements = int(gib * 2**30) // 4
    big = torch.randn(elements, dtype=torch.float32, device=device)
    read = time_step(lambda: big.sum(), reps, 1, guard, sync, 0.2)
    rates = {"sum_gbps": elements * 4 / read.median_s / 1e9}
    matrix, row = big.view(-1, 1024), torch.randn(1, 1024, device=device)
    with torch.no_grad():
        if native.linear(row, matrix, None) is not None:
            stream = time_step(lambda: native.linear(row, matrix, None), reps, 1, guard, sync, 0.2)
            rates["native_row_gbps"] = elements * 4 / stream.median_s / 1e9
    half = big[: elements // 2]
    target = torch.empty_like(half)
    copy = time_step(lambda: target.copy_(half), reps, 1, guard, sync, 0.2)
    return {"read_gbps": max(rates.values()), **rates,
            "copy_gbps": 2 * (elements // 2) * 4 / copy.median_s / 1e9}


def measure_rates(shape: TargetShape, args: argparse.Namespace, dtype, guard, sync,
                  lengths: list[int]) -> dict:
    """One round of every rate the roofline uses (unblocked attention only at `lengths`)."""
    sizes = list(args.tree_sizes)
    return {
        "gemm": measure_gemm(shape, sizes, dtype, args.device, guard, sync, args.rate_reps),
        "attention": measure_attention_matmul(shape, sizes, lengths, dtype, args.device, guard,
                                              sync, args.rate_reps),
        "bandwidth": measure_bandwidth(args.device, guard, sync, args.rate_reps),
    }


def combine_rates(rounds: list[dict]) -> dict:
    """The median over rounds of each rate (rounds run before each cache length)."""
    def median_of(path: tuple[str, ...]) -> dict[str, float]:
        tables = []
        for item in rounds:
            for key in path:
                item = item[key]
            tables.append(item)
        keys = {key for table in tables for key in table}
        return {key: statistics.median(t[key] for t in tables if key in t) for key in keys}

    return {
        "rounds": len(rounds),
        "gemm_gflops": median_of(("gemm", "model_mix_gflops")),
        "gemm_gflops_by_kernel": {kernel: median_of(("gemm", "mix_gflops_by_kernel", kernel))
                                  for kernel in rounds[0]["gemm"]["mix_gflops_by_kernel"]},
        "attention_gflops": median_of(("attention", "blocked_gflops")),
        "attention_unblocked_gflops": median_of(("attention", "unblocked_gflops")),
        "attention_matmul_gflops": median_of(("attention", "matmul_gflops")),
        "attention_native_gflops": median_of(("attention", "native_gflops")),
        "attention_block": rounds[0]["attention"]["block"],
        "read_gbps": statistics.median(r["bandwidth"]["read_gbps"] for r in rounds),
        **{key: statistics.median(r["bandwidth"][key] for r in rounds)
           for key in ("sum_gbps", "native_row_gbps") if key in rounds[0]["bandwidth"]},
        "copy_gbps": statistics.median(r["bandwidth"]["copy_gbps"] for r in rounds),
        "per_round": rounds,
    }


def time_breakdown(fn: Callable[[], object], sync) -> dict[str, float]:
    """Seconds of one call by kind of operation (torch.profiler self time on the calling thread).

    linear: aten::mm / addmm, oneDNN's packed linear or sparrow's native row kernel (the
    model's linears and lm_head);
    attention: the SDPA kernels and
    transformers' repeat_kv copies; other: everything else, mostly many small element-wise ops.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        began = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - began
    kinds = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    for event in profiler.key_averages():
        name = event.key
        seconds = event.self_cpu_time_total / 1e6
        if name in ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise",
                    "sparrow::native_linear"):
            kinds["linear"] += seconds
        elif "attention" in name or name in ("aten::clone", "aten::_unsafe_view"):
            kinds["attention"] += seconds
        else:
            kinds["other"] += seconds
    kinds["wall_profiled"] = wall
    return kinds


# ---- roofline ---------------------------------------------------------------------------------


def roofline(shape: TargetShape, counts: dict, weight_elements: int, q: int, length: int,
             element_bytes: int, gemm_gflops: float, attention_gflops: float,
             bandwidth_gbps: float) -> dict:
    """The additive roofline of one step appending q tokens to a cache of `length` tokens."""
    flops_linear = 2 * counts["linear_weights"] * q
    flops_attention = shape.layers * 4 * shape.heads * shape.head_dim * (length + q) * q
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim
    bytes_moved = (element_bytes * (weight_elements + kv_per_token * length + kv_per_token * q)
                   + 4 * q * shape.vocab)
    linear_compute_s = flops_linear / (gemm_gflops * 1e9)
    attention_compute_s = flops_attention / (attention_gflops * 1e9)
    compute_s = linear_compute_s + attention_compute_s
    memory_s = bytes_moved / (bandwidth_gbps * 1e9)
    kv_bytes = element_bytes * kv_per_token * (length + q)
    return {
        # the parts, for the breakdown: linears with their weights, attention with its cache
        "linear_roofline_s": linear_compute_s
        + (bytes_moved - kv_bytes) / (bandwidth_gbps * 1e9),
        "attention_roofline_s": attention_compute_s + kv_bytes / (bandwidth_gbps * 1e9),
        "flops_linear": flops_linear,
        "flops_attention": flops_attention,
        "bytes": bytes_moved,
        "compute_s": compute_s,
        "memory_s": memory_s,
        "roofline_s": compute_s + memory_s,
        # the other bound: compute and memory traffic fully overlapped
        "overlapped_roofline_s": max(compute_s, memory_s),
    }


# ---- the steps --------------------------------------------------------------------------------


def sdpa_step(adapter: TargetAdapter, cache, tokens, depths, tree_mask, length: int):
    """One step through transformers' own sdpa attention over `cache` (4-D additive tree mask)."""
    q = tokens.shape[0]
    device, dtype = adapter.device, adapter.dtype
    attention_mask = None
    if q > 1:
        visible = torch.ones(q, length + q, dtype=torch.bool, device=device)
        visible[:, length:] = tree_mask.to(device)
        additive = torch.zeros(q, length + q, dtype=dtype, device=device)
        additive.masked_fill_(~visible, torch.finfo(dtype).min)
        attention_mask = additive[None, None]  # (1, 1, q, T + q): used as given by every family
    out = adapter.model.model(
        input_ids=tokens.reshape(1, q).to(device),
        position_ids=(depths.to(device) + length + adapter.position_offset)[None],
        attention_mask=attention_mask,
        cache=cache,
        use_cache=True,
    )
    return adapter.lm_head(out.last_hidden_state[0]).float()


class Linears:
    """Run an implementation with the engine's CPU linears (the default), or, for
    "sparrow+mkl", with torch's own (MKL) `F.linear` (packed again on exit), or, for
    "sparrow+onednn", with the native kernel on one row only (restored on exit)."""

    def __init__(self, adapter: TargetAdapter, implementation: str):
        self.model, self.implementation = adapter.model, implementation

    def __enter__(self):
        if self.implementation == "sparrow+mkl":
            unpack_linears(self.model)
        elif self.implementation == "sparrow+onednn":
            self.rows, native.LINEAR_MAX_ROWS = native.LINEAR_MAX_ROWS, 1

    def __exit__(self, *exc):
        if self.implementation == "sparrow+mkl":
            pack_linears(self.model)
        elif self.implementation == "sparrow+onednn":
            native.LINEAR_MAX_ROWS = self.rows


class AttentionImplementation:
    """Temporarily route the language model's attention through `name`."""

    def __init__(self, adapter: TargetAdapter, name: str):
        self.config, self.name = adapter.text_config, name

    def __enter__(self):
        self.previous = self.config._attn_implementation
        self.config._attn_implementation = self.name

    def __exit__(self, *exc):
        self.config._attn_implementation = self.previous


def step_functions(adapter: TargetAdapter, implementation: str, length: int, q: int, tree,
                   dynamic_cache) -> Callable[[], torch.Tensor]:
    """A closure running one step of `implementation` and rolling the cache back."""
    tokens = torch.randint(10, adapter.vocab_size - 2, (q,), generator=torch.Generator().manual_seed(q))
    if q == 1:
        depths, mask = torch.zeros(1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
    else:
        _, depths, mask = tree
    if implementation in ("sparrow", "sparrow+mkl", "sparrow+onednn"):  # linears: see `Linears`
        def run():
            logits = adapter.forward(tokens, depths, mask if q > 1 else None).logits
            adapter.truncate(length)
            return logits
    elif implementation == "sdpa+static":
        def run():
            with AttentionImplementation(adapter, "sdpa"):
                logits = sdpa_step(adapter, adapter.cache, tokens, depths, mask, length)
            adapter.truncate(length)
            return logits
    elif implementation == "sdpa+dynamic":
        def run():
            with AttentionImplementation(adapter, "sdpa"):
                logits = sdpa_step(adapter, dynamic_cache, tokens, depths, mask, length)
            dynamic_cache.crop(-q)
            return logits
    else:
        raise ValueError(f"unknown implementation {implementation!r}")
    return torch.no_grad()(run)


# ---- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    device = args.device
    dtype = getattr(torch, args.dtype)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    on_cpu = device == "cpu"
    if on_cpu:
        def sync():
            return None
    else:
        def sync():
            torch.cuda.synchronize(device)
    guard = CpuLoadGuard(args.idle_threshold, args.max_wait, enabled=on_cpu)
    if args.target == "reference":
        adapter = load_target("reference", device=device, dtype=dtype)
        text = adapter.config.get_text_config()
        shape = TargetShape(hidden=text.hidden_size, layers=text.num_hidden_layers,
                            heads=text.num_attention_heads, kv_heads=text.num_key_value_heads,
                            intermediate=text.intermediate_size, vocab=text.vocab_size)
    else:
        shape = TargetShape()
        adapter = build_target(shape, dtype, device)
    started = time.perf_counter()
    log = print if not args.quiet else (lambda *a, **k: None)

    log(f"threads {torch.get_num_threads()}, device {device}, dtype {args.dtype}")
    results: dict = {"machine": machine_info(device),
                     "command": " ".join(["python", *sys.argv]), "arguments": vars(args)}
    counts = parameter_counts(adapter)
    tied = adapter.model.lm_head.weight is adapter.model.get_input_embeddings().weight
    results["target"] = {**asdict(shape), "head_dim": shape.head_dim, "dtype": args.dtype,
                         "parameters": counts, "name": args.target,
                         "language_model": type(adapter.model.model.language_model).__name__,
                         "tied_lm_head": tied}
    log(f"target: {counts['text_total'] / 1e6:.1f}M text parameters ({asdict(shape)})")
    max_q = max(args.tree_sizes)
    prepare_cache(adapter, max(args.lengths) + max_q + 8)
    generator = torch.Generator().manual_seed(0)
    trees = {q: random_tree(q, args.max_depth, generator) for q in args.tree_sizes}
    results["trees"] = {str(q): {"parents": t[0].tolist(), "max_depth": int(t[1].max())}
                        for q, t in trees.items()}

    rounds, steps, exactness = [], [], {}
    for index, length in enumerate(args.lengths):
        # Rates are measured again before every length: the roofline then shares the steps'
        # conditions (a shared machine drifts), and the median over rounds is what it uses.
        rounds.append(measure_rates(shape, args, dtype, guard, sync,
                                    list(args.lengths) if index == 0 else []))
        latest = rounds[-1]
        log(f"rates: GEMM mix {fmt(latest['gemm']['model_mix_gflops'])} GFLOP/s, attention "
            f"{fmt(latest['attention']['blocked_gflops'])} GFLOP/s, read "
            f"{latest['bandwidth']['read_gbps']:.1f} GB/s")
        set_cache_length(adapter, length)
        dynamic = dynamic_cache_like(adapter, length) if "sdpa+dynamic" in args.compare else None
        reps = args.reps if length < 16384 else max(5, args.reps_long)
        # Implementations take turns per step, so that each comparison shares the conditions.
        for q in [1, *args.tree_sizes]:
            for implementation in ("sparrow", *args.compare):
                run_step = step_functions(adapter, implementation, length, q, trees.get(q),
                                          dynamic)
                with Linears(adapter, implementation):
                    timing = time_step(run_step, reps, args.warmup, guard, sync)
                if adapter.cache_length != length:
                    raise RuntimeError(f"{implementation} did not roll the cache back")
                step = {
                    "length": length,
                    "implementation": implementation,
                    "step": STEP_DECODE if q == 1 else f"verify {q}",
                    "q": q,
                    **asdict(timing),
                }
                if implementation == "sparrow" and on_cpu and args.breakdown:
                    guard.wait_idle()
                    step["breakdown_s"] = time_breakdown(run_step, sync)
                steps.append(step)
                log(f"T={length:>6} {implementation:<13} {step['step']:<10} "
                    f"{timing.median_s * 1e3:8.1f} ms  (disturbed {timing.disturbed})")
        exactness[str(length)] = compare_logits(adapter, length, trees[max_q], dynamic)
        del dynamic

    rates = combine_rates(rounds)
    for step in steps:
        step.update(step_rooflines(shape, counts, adapter, step, rates, args, element_bytes))
    add_ratios(steps)
    results["rates"] = rates
    results["steps"] = steps
    results["exactness"] = exactness
    results["summary"] = summarize(steps, args)
    results["waited_for_idle_s"] = round(guard.waited_s, 1)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    return results


def fmt(table: dict[str, float]) -> str:
    return "/".join(f"{value:.0f}" for value in table.values())


def step_rooflines(shape: TargetShape, counts: dict, adapter: TargetAdapter, step: dict,
                   rates: dict, args: argparse.Namespace, element_bytes: int) -> dict:
    """The step's roofline at its own q's rates, and at the best rates of any q (peak)."""
    q, length = step["q"], step["length"]
    rate_key = str(q if q in args.tree_sizes else min(args.tree_sizes))
    weights = weight_elements_read(adapter, q)
    line = roofline(shape, counts, weights, q, length, element_bytes,
                    rates["gemm_gflops"][rate_key], rates["attention_gflops"][rate_key],
                    rates["read_gbps"])
    peak = roofline(shape, counts, weights, q, length, element_bytes,
                    max(rates["gemm_gflops"].values()), max(rates["attention_gflops"].values()),
                    rates["read_gbps"])
    return {
        **line,
        "measured_over_roofline": step["median_s"] / line["roofline_s"],
        "measured_over_overlapped_roofline": step["median_s"] / line["overlapped_roofline_s"],
        "peak_roofline_s": peak["roofline_s"],
        "measured_over_peak_roofline": step["median_s"] / peak["roofline_s"],
    }


@torch.no_grad()
def compare_logits(adapter: TargetAdapter, length: int, tree, dynamic) -> dict:
    """Max |logit difference| of the verify of the largest tree: sparrow vs transformers sdpa."""
    q = tree[0].shape[0]
    reference = step_functions(adapter, "sdpa+static", length, q, tree, dynamic)()
    ours = step_functions(adapter, "sparrow", length, q, tree, dynamic)()
    return {"q": q, "max_abs_logit_diff": float((ours - reference).abs().max()),
            "logit_scale": float(reference.abs().max())}


def add_ratios(steps: list[dict]) -> None:
    """verify/decode within each (length, implementation); and each step vs sparrow's."""
    by_key = {(s["length"], s["implementation"], s["q"]): s for s in steps}
    for step in steps:
        decode = by_key[(step["length"], step["implementation"], 1)]
        step["over_decode"] = step["median_s"] / decode["median_s"]
        ours = by_key.get((step["length"], "sparrow", step["q"]))
        step["over_sparrow"] = step["median_s"] / ours["median_s"] if ours else None


def summarize(steps: list[dict], args: argparse.Namespace) -> dict:
    """The two goals: every step within 1.3x of its roofline; verify(16) at 25k <= 1.5x decode."""
    ours = [s for s in steps if s["implementation"] == "sparrow"]
    longest, smallest = max(args.lengths), min(args.tree_sizes)
    verify = next((s for s in ours if s["length"] == longest and s["q"] == smallest), None)
    decode = next((s for s in ours if s["length"] == longest and s["q"] == 1), None)
    return {
        "all_within_1.3x_roofline": all(s["measured_over_roofline"] <= 1.3 for s in ours),
        "over_1.3x_roofline": [f"{s['step']} @ {s['length']}: x{s['measured_over_roofline']:.2f}"
                               for s in ours if s["measured_over_roofline"] > 1.3],
        "worst_over_roofline": max(s["measured_over_roofline"] for s in ours),
        "worst_over_peak_roofline": max(s["measured_over_peak_roofline"] for s in ours),
        f"verify{smallest}_over_decode_at_{longest}": verify and verify["over_decode"],
        f"roofline_verify{smallest}_over_roofline_decode_at_{longest}":
            verify and decode and verify["roofline_s"] / decode["roofline_s"],
        "verify_over_decode_goal_met": bool(verify and verify["over_decode"] <= 1.5),
    }


# ---- outputs ----------------------------------------------------------------------------------


def write_markdown(results: dict, path: Path) -> None:
    rates = results["rates"]
    machine = results["machine"]
    target = results["target"]
    steps = results["steps"]
    ours = [s for s in steps if s["implementation"] == "sparrow"]
    by_kernel = {k: v for k, v in rates.get("gemm_gflops_by_kernel", {}).items() if k != "best"}
    lines = [
        "# Verify and decode cost beside the roofline",
        "",
        f"`{results['command']}`",
        "",
        f"{machine.get('gpu') or machine['cpu']}, {machine['torch_threads']} torch threads, "
        f"torch {machine['torch']}, transformers {machine.get('transformers', '?')}, "
        f"{machine['date']}.",
        f"Target: {target.get('name', 'random')} ({target.get('language_model', 'Qwen2Model')}), "
        f"hidden {target['hidden']}, {target['layers']} layers, "
        f"{target['heads']} heads / {target['kv_heads']} KV heads, head dim {target['head_dim']}, "
        f"FFN {target['intermediate']}, vocab {target['vocab']}, "
        f"{'tied' if target.get('tied_lm_head') else 'untied'} lm_head: "
        f"{target['parameters']['text_total'] / 1e6:.1f}M parameters "
        f"({target['parameters']['linear_weights'] / 1e6:.1f}M in linears + lm_head), "
        f"{target['dtype']}.",
        "",
        "## Rates (median over the rounds measured before each cache length)",
        "",
        f"Bandwidth BW: {rates['read_gbps']:.1f} GB/s read (the fastest read of 1 GiB: "
        + (f"native row kernel {rates['native_row_gbps']:.1f}, " if "native_row_gbps" in rates
           else "") + f"sum {rates.get('sum_gbps', rates['read_gbps']):.1f}), "
        f"{rates['copy_gbps']:.1f} GB/s copy (read + write).",
        "",
        "| q | R_gemm(q) GFLOP/s: model linear mix, M = q, faster kernel per shape | "
        + "".join(f"{kernel} mix | " for kernel in by_kernel)
        + "R_attn(q) GFLOP/s: the faster of the next two | "
        f"(G*q x D) @ (D x {rates['attention_block']}) and P @ V | native tree attention over "
        f"{8 * rates['attention_block']} keys | "
        "unblocked (G*q x D) @ (D x T) GFLOP/s (MKL) |",
        "|---:|---:|" + "---:|" * len(by_kernel) + "---:|---:|---:|---|",
    ]
    for q in sorted(rates["gemm_gflops"], key=int):
        unblocked = ", ".join(
            f"{value:.0f} at T={key.split('@')[1]}"
            for key, value in sorted(rates["attention_unblocked_gflops"].items(),
                                     key=lambda item: int(item[0].split("@")[1]))
            if key.split("@")[0] == q)
        lines.append(f"| {q} | {rates['gemm_gflops'][q]:.1f} | "
                     + "".join(f"{by_kernel[k][q]:.1f} | " for k in by_kernel)
                     + f"{rates['attention_gflops'][q]:.1f} | "
                     + f"{rates.get('attention_matmul_gflops', {}).get(q, float('nan')):.1f} | "
                     + f"{rates.get('attention_native_gflops', {}).get(q, float('nan')):.1f} | "
                     + f"{unblocked} |")
    lines += [
        "",
        "roofline = FLOPs_linear / R_gemm(q) + FLOPs_attn / R_attn(q) + bytes / BW, at the "
        "step's own q (decode: the smallest tree's rates): compute and memory traffic added, no "
        "overlap; overlapped roofline: the larger of the two, as if they overlapped fully (the "
        "lower bound); peak roofline: the best R_gemm and R_attn of any q. Formula and byte "
        "count: the script's docstring.",
        "",
        "## sparrow attention",
        "",
        "| cached tokens | step | median ms | roofline ms | measured / roofline | overlapped "
        "roofline ms | measured / overlapped | verify / decode | peak roofline ms | measured / peak |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in ours:
        lines.append(
            f"| {s['length']} | {s['step']} | {s['median_s'] * 1e3:.1f} | "
            f"{s['roofline_s'] * 1e3:.1f} | {s['measured_over_roofline']:.2f} | "
            f"{s['overlapped_roofline_s'] * 1e3:.1f} | {s['measured_over_overlapped_roofline']:.2f} | "
            f"{s['over_decode']:.2f} | {s['peak_roofline_s'] * 1e3:.1f} | "
            f"{s['measured_over_peak_roofline']:.2f} |"
        )
    if any("breakdown_s" in s for s in ours):
        lines += [
            "",
            "Where the time goes (one profiled call; roofline terms beside it):",
            "",
            "| cached tokens | step | linear ms (roofline: compute + weights) | attention ms "
            "(roofline: compute + KV) | other ms | profiled wall ms |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for s in ours:
            if "breakdown_s" not in s:
                continue
            b = s["breakdown_s"]
            lines.append(
                f"| {s['length']} | {s['step']} | {b['linear'] * 1e3:.1f} "
                f"({s['linear_roofline_s'] * 1e3:.1f}) | {b['attention'] * 1e3:.1f} "
                f"({s['attention_roofline_s'] * 1e3:.1f}) | {b['other'] * 1e3:.1f} | "
                f"{b['wall_profiled'] * 1e3:.1f} |"
            )
    others = [i for i in IMPLEMENTATIONS if i != "sparrow"
              and any(s["implementation"] == i for s in steps)]
    if others:
        lines += [
            "",
            "## Other implementations, same weights and cache contents",
            "",
            "sparrow+mkl: the same engine path with torch's own CPU linears (MKL) instead of "
            "the native / oneDNN-packed ones; sparrow+onednn: the native linear kernel on one row "
            "only (the engine before it took up to 32), verifies on oneDNN; sdpa+static / "
            "sdpa+dynamic: transformers' sdpa attention over our static cache / its DynamicCache.",
            "",
            "| cached tokens | step | sparrow ms | "
            + " | ".join(f"{i} ms (x sparrow)" for i in others) + " |",
            "|---:|---|---:|" + "---:|" * len(others),
        ]
        by_key = {(s["length"], s["implementation"], s["q"]): s for s in steps}
        for s in ours:
            cells = []
            for other in others:
                o = by_key.get((s["length"], other, s["q"]))
                cells.append(f"{o['median_s'] * 1e3:.1f} (x{o['over_sparrow']:.2f})" if o else "-")
            lines.append(f"| {s['length']} | {s['step']} | {s['median_s'] * 1e3:.1f} | "
                         + " | ".join(cells) + " |")
    summary = results["summary"]
    lines += ["", "## Summary", ""]
    lines += [f"- {key}: {value if not isinstance(value, float) else round(value, 3)}"
              for key, value in summary.items()]
    for length, check in results.get("exactness", {}).items():
        lines.append(f"- logits, verify {check['q']} at {length}: sparrow vs sdpa max |diff| "
                     f"{check['max_abs_logit_diff']:.2e} (max |logit| {check['logit_scale']:.1f})")
    lines.append(f"- waited for an idle CPU: {results['waited_for_idle_s']} s; "
                 f"disturbed repetitions redone: "
                 f"{sum(s['disturbed'] for s in steps)}; wall {results['wall_s']} s")
    path.write_text("\n".join(lines) + "\n")


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = results["steps"]
    lengths = sorted({s["length"] for s in steps})
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"sparrow": "-", "sparrow+mkl": (0, (5, 1)), "sparrow+onednn": (0, (3, 1, 1, 1)),
              "sdpa+static": ":", "sdpa+dynamic": "-."}
    for index, length in enumerate(lengths):
        color = f"C{index}"
        ours = sorted((s for s in steps if s["length"] == length
                       and s["implementation"] == "sparrow"), key=lambda s: s["q"])
        qs = [s["q"] for s in ours]
        left.plot(qs, [s["roofline_s"] * 1e3 for s in ours], "--", color=color, alpha=0.6,
                  label=f"{length}: roofline")
        for implementation, style in styles.items():
            rows = sorted((s for s in steps if s["length"] == length
                           and s["implementation"] == implementation), key=lambda s: s["q"])
            if rows:
                left.plot([s["q"] for s in rows], [s["median_s"] * 1e3 for s in rows],
                          linestyle=style, marker="o", color=color, label=f"{length}: {implementation}")
        right.plot(qs, [s["measured_over_roofline"] for s in ours], "-o", color=color,
                   label=f"{length} cached")
    right.axhline(1.3, color="grey", linestyle="--", linewidth=1, label="1.3x goal")
    ticks = sorted({s["q"] for s in steps})
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.set_xlabel("tokens per step (1 = decode, else tree verify)")
    left.set_yscale("log")
    left.set_ylabel("median ms per step")
    left.set_title("step time")
    left.legend(fontsize=6, ncol=2)
    right.set_ylabel("measured / roofline")
    right.set_title("sparrow attention vs roofline")
    right.legend(fontsize=8)
    machine = results["machine"]
    figure.suptitle(f"{machine.get('gpu') or machine['cpu']}, {machine['torch_threads']} threads,"
                    f" {results['target']['dtype']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", choices=["random", "reference"], default="random",
                        help="random: the 122M Qwen2-shaped model above; reference: sparrow's "
                             "reference target (SmolLM2-135M with eyes, tied lm_head)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 25000])
    parser.add_argument("--tree-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions per step")
    parser.add_argument("--reps-long", type=int, default=7,
                        help="repetitions at lengths >= 16384 (at least 5)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls before each step (default 2 on CPU, 10 on CUDA: on an "
                             "H200 the first step measured was 2x slow after 2)")
    parser.add_argument("--rate-reps", type=int, default=7,
                        help="repetitions of the GEMM / bandwidth measurements")
    parser.add_argument("--max-depth", type=int, default=6, help="deepest tree level")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compare", nargs="*", default=["sparrow+mkl", "sdpa+static", "sdpa+dynamic"],
                        choices=[i for i in IMPLEMENTATIONS if i != "sparrow"],
                        help="implementations timed beside sparrow")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own default)")
    parser.add_argument("--idle-threshold", type=float, default=0.25,
                        help="CPU cores other processes may use during a repetition")
    parser.add_argument("--max-wait", type=float, default=30.0,
                        help="seconds to wait for an idle CPU before each repetition")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="", help="file suffix, e.g. h100: verify_cost_h100.*")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                        help="skip the profiled linear / attention / other split of each step")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.warmup is None:
        args.warmup = 2 if args.device == "cpu" else 10
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "verify_cost" + (f"_{args.tag}" if args.tag else "")
    json_path = args.out / f"{stem}.json"
    results["arguments"] = {k: str(v) if isinstance(v, Path) else v
                            for k, v in results["arguments"].items()}
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, args.out / f"{stem}.md")
    write_plot(results, args.out / f"{stem}.png")
    print(f"wrote {json_path}, {stem}.md, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
