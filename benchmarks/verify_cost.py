"""Cost of one tree verify and one AR decode step against a long KV cache, beside the roofline.

What is timed (median over --reps after warm-up; each step is one target forward followed by a
truncate back to the cached length, so every repetition sees the same cache):

* ``decode``: one AR step (q = 1) through `sparrow.targets` (attention "sparrow").
* ``verify q``: one EAGLE-style tree of q tokens (random parents before children, depth <= 6,
  mask from `ancestor_mask`) through the same adapter.

The same steps run, on the same weights and cache contents, through transformers' own
attention for comparison:

* ``sdpa+static``: attention "sdpa" over the same `StaticKVCache`, the tree given as a 4-D
  additive mask; with a mask, transformers' sdpa path calls `repeat_kv` and so copies the
  whole cache (times the GQA group count) in every layer.
* ``sdpa+dynamic``: the transformers default, attention "sdpa" over a `DynamicCache`, which
  also `torch.cat`s the whole cache in every layer on every step (rolled back with `crop`).

The target is a random ~120M-parameter Qwen2-shaped language model inside a LLaVA-OneVision
shell (tiny SigLIP tower, never run). The cache is not prefilled at 25k tokens (minutes on this
CPU): a short prompt is prefilled with enough capacity, the cache buffers are filled with random
values and their length is set (step time does not depend on cache contents).

Roofline (additive, no overlap of compute and memory traffic) of a step that appends q tokens
to a cache of T tokens, with L layers, H query heads, H_kv KV heads, head dim D, b bytes per
element:

    FLOPs_linear = 2 * P_linear * q       P_linear: every decoder-layer linear weight + lm_head
                                          (lm_head runs on all q tokens)
    FLOPs_attn   = L * 4 * H * D * (T + q) * q          (Q K^T and P V over all T + q keys)
    bytes        = b * (P_weights_read                  every weight a step reads: the decoder
                                                        layers, final norm, lm_head, q rows of
                                                        the embedding table
                        + 2 * L * H_kv * D * T          the KV cache read
                        + 2 * L * H_kv * D * q)         the new keys/values written
                   + 4 * q * V                          fp32 logits written
    roofline     = FLOPs_linear / R_gemm + FLOPs_attn / R_attn(T) + bytes / BW

R_gemm: median GFLOP/s of torch.mm over the model's own linear shapes (d->d, d->kv, d->ffn,
ffn->d, d->vocab) at M in the tree sizes. R_attn(T): median GFLOP/s of the attention-shaped
matmul (G*q x D) @ (D x T) (G = H / H_kv, the GQA-packed query rows per KV head) at the same q.
BW: GB/s of a sum over a 1 GiB tensor (read-dominated; a copy is measured and recorded too).
All three are measured in the same run, on the same device, with the same threads.

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
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sparrow.decoding.tree import ancestor_mask
from sparrow.targets import TargetAdapter, wrap_model

STEP_DECODE = "decode"
IMPLEMENTATIONS = ("sparrow", "sdpa+static", "sdpa+dynamic")


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
    return {
        "language_model": sum(p.numel() for p in language_model.parameters()),
        "lm_head": adapter.model.lm_head.weight.numel(),
        "text_total": sum(p.numel() for p in language_model.parameters())
        + adapter.model.lm_head.weight.numel(),
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

    def wait_idle(self, window_s: float = 0.2) -> None:
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
              sync: Callable[[], None]) -> Timing:
    """Median wall time of `fn` over `reps` undisturbed repetitions (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    sync()
    times, loads, disturbed = [], [], 0
    attempts = 0
    while len(times) < reps and attempts < 4 * reps:
        attempts += 1
        guard.wait_idle()
        start = guard.begin()
        began = time.perf_counter()
        fn()
        sync()
        elapsed = time.perf_counter() - began
        load = guard.others(start)
        # A short step spans few scheduler ticks; only a clear signal counts as disturbance.
        if load >= guard.threshold and elapsed * load * guard.ticks >= 2:
            disturbed += 1
            continue
        times.append(elapsed)
        loads.append(round(load, 3))
    if not times:  # the machine never went quiet: report what there is, flagged
        times = [elapsed]
        loads = [round(load, 3)]
    return Timing(statistics.median(times), times, disturbed, loads)


# ---- machine rates ----------------------------------------------------------------------------


def measure_gemm(shape: TargetShape, rows: list[int], dtype, device, guard, sync,
                 reps: int) -> dict:
    """GFLOP/s of torch.mm on the model's linear shapes (one of each kind) at M = each of rows."""
    kinds = sorted(set(shape.linear_shapes()))
    results = {}
    for m in rows:
        for fan_in, fan_out in kinds:
            x = torch.randn(m, fan_in, dtype=dtype, device=device)
            w = torch.randn(fan_in, fan_out, dtype=dtype, device=device)
            timing = time_step(lambda x=x, w=w: torch.mm(x, w), reps, 2, guard, sync)
            results[f"{m}x{fan_in}x{fan_out}"] = 2 * m * fan_in * fan_out / timing.median_s / 1e9
    return {"per_shape_gflops": results, "median_gflops": statistics.median(results.values())}


def measure_attention_matmul(shape: TargetShape, tree_sizes: list[int], length: int, dtype,
                             device, guard, sync, reps: int) -> dict:
    """GFLOP/s of the GQA-packed score matmul (G*q x D) @ (D x T) for each q."""
    keys_t = torch.randn(shape.head_dim, length, dtype=dtype, device=device)
    results = {}
    for q in tree_sizes:
        queries = torch.randn(shape.groups * q, shape.head_dim, dtype=dtype, device=device)
        timing = time_step(lambda a=queries: torch.mm(a, keys_t), reps, 2, guard, sync)
        flops = 2 * shape.groups * q * shape.head_dim * length
        results[str(q)] = flops / timing.median_s / 1e9
    return {"per_q_gflops": results, "median_gflops": statistics.median(results.values())}


def measure_bandwidth(device, guard, sync, reps: int, gib: float = 1.0) -> dict:
    """GB/s of a read-dominated sum over `gib` GiB, and of a copy (read + write counted)."""
    elements = int(gib * 2**30) // 4
    big = torch.ones(elements, dtype=torch.float32, device=device)
    read = time_step(lambda: big.sum(), reps, 1, guard, sync)
    half = big[: elements // 2]
    target = torch.empty_like(half)
    copy = time_step(lambda: target.copy_(half), reps, 1, guard, sync)
    del big, target
    return {
        "read_gbps": elements * 4 / read.median_s / 1e9,
        "copy_gbps": 2 * (elements // 2) * 4 / copy.median_s / 1e9,
        "bytes_read": elements * 4,
    }


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
    compute_s = flops_linear / (gemm_gflops * 1e9) + flops_attention / (attention_gflops * 1e9)
    memory_s = bytes_moved / (bandwidth_gbps * 1e9)
    return {
        "flops_linear": flops_linear,
        "flops_attention": flops_attention,
        "bytes": bytes_moved,
        "compute_s": compute_s,
        "memory_s": memory_s,
        "roofline_s": compute_s + memory_s,
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
        attention_mask = {"full_attention": additive[None, None]}  # (1, 1, q, T + q)
    out = adapter.model.model(
        input_ids=tokens.reshape(1, q).to(device),
        position_ids=(depths.to(device) + length)[None],
        attention_mask=attention_mask,
        cache=cache,
        use_cache=True,
    )
    return adapter.lm_head(out.last_hidden_state[0]).float()


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
    tokens = torch.randint(100, 1000, (q,), generator=torch.Generator().manual_seed(q))
    if q == 1:
        depths, mask = torch.zeros(1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
    else:
        _, depths, mask = tree
    if implementation == "sparrow":
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


def machine_info(device: str) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(args: argparse.Namespace) -> dict:
    device = args.device
    dtype = getattr(torch, args.dtype)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    if device.startswith("cuda"):
        def sync():
            torch.cuda.synchronize(device)
    else:
        def sync():
            return None
    guard = CpuLoadGuard(args.idle_threshold, args.max_wait, enabled=device == "cpu")
    shape = TargetShape()
    started = time.perf_counter()
    log = print if not args.quiet else (lambda *a, **k: None)

    log(f"threads {torch.get_num_threads()}, device {device}, dtype {args.dtype}")
    results: dict = {"machine": machine_info(device), "command": " ".join([sys.executable, *sys.argv]),
                     "arguments": vars(args)}
    gemm = measure_gemm(shape, list(args.tree_sizes), dtype, device, guard, sync, args.rate_reps)
    log(f"GEMM rate (model linear shapes, M in {args.tree_sizes}): "
        f"{gemm['median_gflops']:.1f} GFLOP/s")
    bandwidth = measure_bandwidth(device, guard, sync, args.rate_reps)
    log(f"bandwidth: read {bandwidth['read_gbps']:.1f} GB/s, copy {bandwidth['copy_gbps']:.1f} GB/s")
    results["rates"] = {"gemm": gemm, "bandwidth": bandwidth, "attention_matmul": {}}

    adapter = build_target(shape, dtype, device)
    counts = parameter_counts(adapter)
    results["target"] = {**asdict(shape), "head_dim": shape.head_dim, "dtype": args.dtype,
                         "parameters": counts}
    log(f"target: {counts['text_total'] / 1e6:.1f}M text parameters ({asdict(shape)})")
    max_q = max(args.tree_sizes)
    prepare_cache(adapter, max(args.lengths) + max_q + 8)
    generator = torch.Generator().manual_seed(0)
    trees = {q: random_tree(q, args.max_depth, generator) for q in args.tree_sizes}
    results["trees"] = {str(q): {"parents": t[0].tolist(), "max_depth": int(t[1].max())}
                        for q, t in trees.items()}

    steps = []
    for length in args.lengths:
        attention = measure_attention_matmul(shape, list(args.tree_sizes), length, dtype, device,
                                             guard, sync, args.rate_reps)
        results["rates"]["attention_matmul"][str(length)] = attention
        set_cache_length(adapter, length)
        dynamic = dynamic_cache_like(adapter, length) if "sdpa+dynamic" in args.compare else None
        reps = args.reps if length < 16384 else max(5, args.reps_long or args.reps)
        for implementation in ("sparrow", *args.compare):
            for q in [1, *args.tree_sizes]:
                run_step = step_functions(adapter, implementation, length, q, trees.get(q),
                                          dynamic)
                timing = time_step(run_step, reps, args.warmup, guard, sync)
                assert adapter.cache_length == length
                line = roofline(shape, counts, weight_elements_read(adapter, q), q, length,
                                element_bytes, gemm["median_gflops"],
                                attention["median_gflops"], bandwidth["read_gbps"])
                step = {
                    "length": length,
                    "implementation": implementation,
                    "step": STEP_DECODE if q == 1 else f"verify {q}",
                    "q": q,
                    **asdict(timing),
                    **line,
                    "measured_over_roofline": timing.median_s / line["roofline_s"],
                }
                steps.append(step)
                log(f"T={length:>6} {implementation:<13} {step['step']:<10} "
                    f"{timing.median_s * 1e3:8.1f} ms  roofline {line['roofline_s'] * 1e3:7.1f} ms"
                    f"  x{step['measured_over_roofline']:.2f}  (disturbed {timing.disturbed})")
        results["exactness"] = results.get("exactness", {})
        results["exactness"][str(length)] = compare_logits(adapter, length, trees[max_q],
                                                           dynamic)
        del dynamic
    add_ratios(steps)
    results["steps"] = steps
    results["summary"] = summarize(steps, args)
    results["waited_for_idle_s"] = round(guard.waited_s, 1)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    return results


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
    ours = [s for s in steps if s["implementation"] == "sparrow"]
    longest, smallest = max(args.lengths), min(args.tree_sizes)
    target_step = next((s for s in ours if s["length"] == longest and s["q"] == smallest), None)
    return {
        "all_within_1.3x_roofline": all(s["measured_over_roofline"] <= 1.3 for s in ours),
        "worst_over_roofline": max(s["measured_over_roofline"] for s in ours),
        f"verify{smallest}_over_decode_at_{longest}": target_step and target_step["over_decode"],
        "verify_over_decode_goal_met": bool(target_step and target_step["over_decode"] <= 1.5),
    }


# ---- outputs ----------------------------------------------------------------------------------


def write_markdown(results: dict, path: Path) -> None:
    rates = results["rates"]
    machine = results["machine"]
    target = results["target"]
    lines = [
        "# Verify and decode cost beside the roofline",
        "",
        f"`{results['command']}`",
        "",
        f"{machine.get('gpu') or machine['cpu']}, {machine['torch_threads']} torch threads, "
        f"torch {machine['torch']}, transformers {machine.get('transformers', '?')}, "
        f"{machine['date']}.",
        f"Target: Qwen2-shaped LM, hidden {target['hidden']}, {target['layers']} layers, "
        f"{target['heads']} heads / {target['kv_heads']} KV heads, head dim {target['head_dim']}, "
        f"FFN {target['intermediate']}, vocab {target['vocab']}, untied lm_head, "
        f"{target['parameters']['text_total'] / 1e6:.1f}M parameters, {target['dtype']}.",
        f"Rates: GEMM {rates['gemm']['median_gflops']:.1f} GFLOP/s (model linear shapes); "
        "attention-shaped matmul "
        + ", ".join(f"{v['median_gflops']:.1f} @ {k}" for k, v in rates["attention_matmul"].items())
        + f" GFLOP/s; bandwidth {rates['bandwidth']['read_gbps']:.1f} GB/s read, "
        f"{rates['bandwidth']['copy_gbps']:.1f} GB/s copy.",
        "",
        "roofline = FLOPs_linear / R_gemm + FLOPs_attn / R_attn(T) + bytes / BW "
        "(see the script's docstring).",
        "",
        "## sparrow attention",
        "",
        "| cached tokens | step | median ms | roofline ms | measured / roofline | verify / decode |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for s in results["steps"]:
        if s["implementation"] != "sparrow":
            continue
        lines.append(
            f"| {s['length']} | {s['step']} | {s['median_s'] * 1e3:.1f} | "
            f"{s['roofline_s'] * 1e3:.1f} | {s['measured_over_roofline']:.2f} | "
            f"{s['over_decode']:.2f} |"
        )
    others = [i for i in IMPLEMENTATIONS if i != "sparrow"
              and any(s["implementation"] == i for s in results["steps"])]
    if others:
        lines += [
            "",
            "## transformers' sdpa, same weights and cache contents",
            "",
            "| cached tokens | step | sparrow ms | "
            + " | ".join(f"{i} ms (x sparrow)" for i in others) + " |",
            "|---:|---|---:|" + "---:|" * len(others),
        ]
        by_key = {(s["length"], s["implementation"], s["q"]): s for s in results["steps"]}
        for s in results["steps"]:
            if s["implementation"] != "sparrow":
                continue
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
                 f"{sum(s['disturbed'] for s in results['steps'])}; wall {results['wall_s']} s")
    path.write_text("\n".join(lines) + "\n")


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = results["steps"]
    lengths = sorted({s["length"] for s in steps})
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"sparrow": "-", "sdpa+static": ":", "sdpa+dynamic": "-."}
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
                left.plot([s["q"] for s in rows], [s["median_s"] * 1e3 for s in rows], style,
                          marker="o", color=color, label=f"{length}: {implementation}")
        right.plot(qs, [s["measured_over_roofline"] for s in ours], "-o", color=color,
                   label=f"{length} cached")
    right.axhline(1.3, color="grey", linestyle="--", linewidth=1, label="1.3x goal")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
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
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 25000])
    parser.add_argument("--tree-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per step")
    parser.add_argument("--reps-long", type=int, default=5,
                        help="repetitions at lengths >= 16384 (at least 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rate-reps", type=int, default=7,
                        help="repetitions of the GEMM / bandwidth measurements")
    parser.add_argument("--max-depth", type=int, default=6, help="deepest tree level")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compare", nargs="*", default=["sdpa+static", "sdpa+dynamic"],
                        choices=[i for i in IMPLEMENTATIONS if i != "sparrow"],
                        help="transformers implementations timed beside sparrow")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own default)")
    parser.add_argument("--idle-threshold", type=float, default=0.25,
                        help="CPU cores other processes may use during a repetition")
    parser.add_argument("--max-wait", type=float, default=30.0,
                        help="seconds to wait for an idle CPU before each repetition")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="", help="file suffix, e.g. h100: verify_cost_h100.*")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
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
