"""The linears of one target forward over m rows (a decode step: 1; a verify: the tree's size),
three ways: the native row kernel (`sparrow.runtime.native.linear`, which streams each weight
tile once for all m rows), oneDNN's packed kernel (what `sparrow.runtime.linear` runs for more
rows) and MKL (`F.linear`, torch's default).

    python benchmarks/linear_rows.py                       # the reference target's shapes
    python benchmarks/linear_rows.py --rows 1 2 4 8 16 --reps 15

Shapes: every linear of one decoder layer of the reference target (SmolLM2-135M: hidden 576,
9 heads / 3 KV heads of 64, FFN 1536) times its 30 layers, plus the tied lm_head (49152 x 576).
Random fp32 weights (time does not depend on the values). Per m: the median over --reps of one
pass over all of them, in ms, and the weight stream it implies (GB/s). This is the measurement
behind `native.LINEAR_MAX_ROWS`, the row count up to which the native kernel is used. Writes
linear_rows.{json,md,png} under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparrow.machine import machine_info
from sparrow.runtime import native
from sparrow.runtime.linear import PACK_ROWS

LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LAYERS = 30
LM_HEAD = (49152, 576)


def kernels(weights: list[torch.Tensor]) -> dict:
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS) for w in weights]
    return {
        "native": lambda x, i: native.linear(x, weights[i], None),
        "onednn": lambda x, i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], ""),
        "mkl": lambda x, i: F.linear(x, weights[i]),
    }


def time_pass(run, inputs: dict, order: list[int], reps: int) -> float:
    """Median seconds of one pass over the model's linears (unique shapes timed once per pass,
    weighted by how often the model has them)."""
    samples = []
    for _ in range(reps + 2):
        started = time.perf_counter()
        for index in order:
            run(inputs[index], index)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples[2:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24, 32, 48, 64])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if not native.available("linear_rows"):
        raise SystemExit("the native row kernel is not built on this machine (no compiler, or "
                         "neither AVX-512 nor AVX2)")
    configured = native.LINEAR_MAX_ROWS
    native.LINEAR_MAX_ROWS = 64  # the kernel's own limit: measure past the configured one
    torch.manual_seed(0)
    # Every linear of the model, each its own weight (a pass streams all of them from memory).
    shapes = LAYER * LAYERS + [LM_HEAD]
    weights = [torch.randn(out, inp) * 0.02 for out, inp in shapes]
    weight_bytes = sum(w.numel() * 4 for w in weights)
    run_with = kernels(weights)
    rows = []
    with torch.no_grad():
        for m in args.rows:
            inputs = {i: torch.randn(m, w.shape[1]) for i, w in enumerate(weights)}
            order = list(range(len(weights)))
            row = {"rows": m}
            for name, run in run_with.items():
                if name == "native" and m > 64:
                    continue
                seconds = time_pass(run, inputs, order, args.reps)
                row[f"{name}_ms"] = round(seconds * 1e3, 2)
                row[f"{name}_gbps"] = round(weight_bytes / seconds / 1e9, 1)
            rows.append(row)
            print(row, file=sys.stderr)
    result = {"command": "python benchmarks/linear_rows.py " + " ".join(sys.argv[1:]),
              "machine": machine_info(), "weight_mb": round(weight_bytes / 2**20, 1),
              "linear_max_rows": configured, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "linear_rows"
    (args.out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    m = result["machine"]
    lines = [f"# The linears of one reference-target forward over m rows ({m['cpu']}, {m['cpu_isa']}, "
             f"{m['torch_threads']} threads, {m['date'] if 'date' in m else time.strftime('%Y-%m-%d')})", "",
             f"`{result['command']}`; {result['weight_mb']} MB of fp32 weights a pass. "
             f"Median ms a pass (weight stream, GB/s); `native.LINEAR_MAX_ROWS` = "
             f"{configured}.", "",
             "| rows | native row kernel | oneDNN packed | MKL |", "|---:|---:|---:|---:|"]
    for row in rows:
        cells = [f"{row[k + '_ms']} ({row[k + '_gbps']})" if k + "_ms" in row else "-"
                 for k in ("native", "onednn", "mkl")]
        lines.append(f"| {row['rows']} | " + " | ".join(cells) + " |")
    (args.out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name in ("native", "onednn", "mkl"):
        points = [(r["rows"], r[f"{name}_ms"]) for r in rows if f"{name}_ms" in r]
        ax.plot(*zip(*points, strict=True), marker="o", label=name)
    ax.set_xlabel("input rows m (tree tokens)")
    ax.set_ylabel("ms a pass over every linear")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("reference target linears, fp32")
    fig.tight_layout()
    fig.savefig(args.out / f"{tag}.png", dpi=120)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
