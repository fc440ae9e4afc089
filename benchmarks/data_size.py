"""Held-out tau against training tokens for drafts trained on different amounts of data.

    python benchmarks/data_size.py RUN [RUN ...] [--out benchmarks/results/training/data_size]

Each RUN is a `sparrow train --out` directory (the same recipe and data, `--max-samples N`
for the smaller ones: a nested subset drawn by key, the same held-out samples). Reads each
run's `train.json` (samples, answer tokens, steps, wall time, the held-out chain tau every
`--eval-every` steps against the answer tokens trained on, epochs counted) and writes data_size.json, a
markdown table (samples, answer tokens, wall minutes, best and final held-out tau, the step
of the best) and data_size.png (held-out tau by training tokens, one curve per run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def summarize(run: Path) -> dict:
    record = json.loads((run / "train.json").read_text())
    curve = record["held_out_curve"]  # [step, tokens trained on, tau]
    best = max(curve, key=lambda point: point[2])
    return {"run": run.name, "samples": record["samples"], "answer_tokens": record["answer_tokens"],
            "held_out_samples": record["held_out_samples"], "steps": record["steps"],
            "wall_min": record["wall_s_this_run"] / 60, "best_tau": best[2], "best_step": best[0],
            "final_tau": curve[-1][2], "curve": curve, "command": record.get("command"),
            "machine": record.get("machine")}


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"`{command}`", "",
             "| run | training samples | answer tokens | steps | wall min | best held-out tau (step) | "
             "final held-out tau |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['samples']} | {r['answer_tokens']:,} | {r['steps']} | "
                     f"{r['wall_min']:.1f} | {r['best_tau']:.2f} ({r['best_step']}) | {r['final_tau']:.2f} |")
    held = {r["held_out_samples"] for r in rows}
    samples = ", ".join(map(str, held))
    lines += ["", f"Held-out chain tau: greedy draft chains of depth 5 on the same {samples} "
              "held-out samples (stored states, no target call)."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    for r in rows:
        axis.plot([p[1] for p in r["curve"]], [p[2] for p in r["curve"]], marker=".",
                  label=f"{r['samples']} samples ({r['answer_tokens']:,} answer tokens)")
    axis.set_xlabel("answer tokens trained on (every epoch counted)")
    axis.set_ylabel("held-out chain tau (depth 5)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="sparrow train output directories")
    parser.add_argument("--out", default="benchmarks/results/training/data_size")
    args = parser.parse_args(argv)
    rows = sorted((summarize(Path(run)) for run in args.runs), key=lambda r: r["samples"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/data_size.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "data_size.json").write_text(json.dumps({"command": command, "runs": rows}, indent=1) + "\n")
    (out / "data_size.md").write_text(markdown(rows, command))
    plot(rows, out / "data_size.png")
    print(markdown(rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
