"""One forward's attention over a long fp32 KV cache, every layer, two ways: the native kernels
(`sparrow.runtime.native`: `decode_attention` for one new token, `tree_attention` for q) and
SDPA as the engine runs it where they are not built (query heads of a KV head packed into the
query axis; a tree's additive mask).

    python benchmarks/attention_kernels.py                    # the reference target's shape
    python benchmarks/attention_kernels.py --shape benchmark  # the 122M benchmark target's

Shapes: reference = 30 layers of 9 query / 3 KV heads of 64 (SmolLM2-135M); benchmark = 12
layers of 12 / 2 of 64. Each layer has its own cache (a pass streams every layer's K and V from
memory, as a decode step does; one layer's cache alone would sit in L3 at a few thousand
tokens). Per length and new-token count q (1: a decode step; more: a tree of q tokens whose
mask is a random tree): the median over --reps of one pass, in ms, and the K/V stream it
implies (GB/s). The kernels run at every length here, below the thresholds the engine uses them
from (`native.DECODE_MIN_LENGTH`, `native.TREE_MIN_LENGTH`): this is the measurement behind those.
Writes attention_kernels_<shape>_<isa>.{json,md,png} under --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparrow.machine import machine_info
from sparrow.runtime import native
from sparrow.runtime.attention import build_attention_mask

SHAPES = {"reference": (30, 9, 3, 64), "benchmark": (12, 12, 2, 64)}  # layers, heads, KV heads, dim


def random_tree(q: int, generator: torch.Generator) -> torch.Tensor:
    """(q, q) bool: each node sees itself and its ancestors (node i's parent drawn below i)."""
    visible = torch.eye(q, dtype=torch.bool)
    for i in range(1, q):
        parent = int(torch.randint(0, i, (1,), generator=generator))
        visible[i] |= visible[parent]
    return visible


def run_sdpa(packed, keys, values, mask, scale) -> None:
    """SDPA as the engine falls back to it: a KV head's query heads packed into the query axis."""
    for k, v in zip(keys, values, strict=True):
        F.scaled_dot_product_attention(packed, k, v, attn_mask=mask, scale=scale)


def run_native(query, keys, values, visible, scale) -> None:
    for k, v in zip(keys, values, strict=True):
        if query.shape[2] == 1:
            out = native.decode_attention(query, k, v, scale)
        else:
            out = native.tree_attention(query, k, v, visible, scale)
        if out is None:
            raise RuntimeError("the native kernel declined a shape it should take")


def time_pass(run, reps: int) -> float:
    samples = []
    for _ in range(reps + 2):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples[2:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="reference")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 17000, 25000])
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    layers, heads, kv_heads, dim = SHAPES[args.shape]
    groups, scale = heads // kv_heads, dim**-0.5
    generator = torch.Generator().manual_seed(0)
    built = {name: native.available(name) for name in ("decode_attention", "tree_attention")}
    decode_min_length, tree_min_length = native.decode_min_length(), native.tree_min_length()
    # the kernels at every length: the thresholds are measured here
    native.MIN_LENGTH, native.DECODE_MIN_LENGTH, native.TREE_MIN_LENGTH = 1, {}, {}
    rows = []
    with torch.no_grad():
        for length in args.lengths:
            for q in args.queries:
                cache = length + q
                keys = [torch.randn(1, kv_heads, cache, dim, generator=generator) for _ in range(layers)]
                values = [torch.randn(1, kv_heads, cache, dim, generator=generator) for _ in range(layers)]
                query = torch.randn(1, heads, q, dim, generator=generator)
                visible = random_tree(q, generator)
                mask = build_attention_mask(visible, cache, groups, torch.float32) if q > 1 else None
                packed = query.reshape(1, kv_heads, groups * q, dim)

                sdpa = functools.partial(run_sdpa, packed, keys, values, mask, scale)
                kernel = functools.partial(run_native, query, keys, values, visible, scale)
                stream = 2 * layers * kv_heads * cache * dim * 4
                row = {"length": length, "q": q, "kv_mb": round(stream / 2**20, 1)}
                for name, run in (("sdpa", sdpa), ("native", kernel)):
                    if name == "native" and not built["decode_attention" if q == 1 else "tree_attention"]:
                        continue
                    seconds = time_pass(run, args.reps)
                    row[f"{name}_ms"] = round(seconds * 1e3, 2)
                    row[f"{name}_gbps"] = round(stream / seconds / 1e9, 1)
                rows.append(row)
                print(row, file=sys.stderr)
    machine = machine_info()
    isa = machine["cpu_isa"].split()[0].lower().replace("-", "")
    tag = f"attention_kernels_{args.shape}_{isa}"
    result = {"command": "python benchmarks/attention_kernels.py " + " ".join(sys.argv[1:]),
              "machine": machine, "shape": dict(zip(("layers", "heads", "kv_heads", "dim"),
                                                    SHAPES[args.shape], strict=True)),
              "built": built, "min_length": decode_min_length, "tree_min_length": tree_min_length,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Attention of one forward over a long cache, {args.shape} shape ({machine['cpu']}, "
             f"{machine['cpu_isa']}, {machine['torch_threads']} threads, "
             f"{time.strftime('%Y-%m-%d')})", "",
             f"`{result['command']}`; {layers} layers of {heads} query / {kv_heads} KV heads of {dim}, "
             "fp32, each layer its own cache. Median ms a pass over every layer (K/V stream, GB/s). "
             "q = 1: a decode step; q > 1: a random tree of q tokens. Native kernels built here: "
             + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in built.items())
             + f"; the engine runs them from {decode_min_length} cached tokens (decode) and "
             f"{tree_min_length} (tree) on this machine, SDPA below.", "",
             "| cached tokens | q | K/V MB | SDPA | native | SDPA / native |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        native_cell = f"{row['native_ms']} ({row['native_gbps']})" if "native_ms" in row else "-"
        ratio = f"{row['sdpa_ms'] / row['native_ms']:.2f}" if "native_ms" in row else "-"
        lines.append(f"| {row['length']:,} | {row['q']} | {row['kv_mb']} | {row['sdpa_ms']} "
                     f"({row['sdpa_gbps']}) | {native_cell} | {ratio} |")
    (args.out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for q in args.queries:
        for name, style in (("sdpa", "--"), ("native", "-")):
            points = [(r["length"], r[f"{name}_ms"]) for r in rows if r["q"] == q and f"{name}_ms" in r]
            if points:
                ax.plot(*zip(*points, strict=True), style, marker="o", label=f"{name}, q={q}")
    ax.set_xlabel("cached tokens")
    ax.set_ylabel("ms a pass over every layer")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"attention over a long cache, {args.shape} shape, fp32")
    fig.tight_layout()
    fig.savefig(args.out / f"{tag}.png", dpi=120)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
