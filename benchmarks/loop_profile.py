"""Where the decoding loop's time goes, per target call, with trained drafts: the phases of a
round (the draft's tree, the target's verify, acceptance, keeping the accepted path, the rest of
the loop) and inside each phase the kinds of work (linears, attention, other torch ops, and the
Python between ops).

    python benchmarks/loop_profile.py                                   # reference target, 0.5k and 25k
    python benchmarks/loop_profile.py --drafts reference:sparrow,reference:eagle --lengths 0.5k 6k

Per length, one evaluation video of the reference target (as `sparrow bench` renders them) is
prefilled once and plain decoding (AR) and each draft decode the same answer (greedy, --tree,
--max-new-tokens) from that prefill: once untimed (warm-up), once timed without the profiler
(the wall time per target call in the report's first columns), once under torch.profiler. The
profiled run labels each phase with a `record_function` range around the function that does it
(`DraftProposer.propose` / `commit`, `TargetAdapter.forward`, the acceptance function,
`TargetAdapter.keep`) and sorts every torch op inside a range by the time spent in the op itself:

    linear     aten::mm / addmm / bmm, oneDNN's packed linear, sparrow's native linear kernel
    attention  SDPA and sparrow's native attention kernels
    ops        every other torch op (norms, rotary, residual adds, topk, masks, copies)
    python     the range's time outside any torch op: the interpreter between ops

`loop` is the decode phase's time outside the five ranges (the loop's own Python: emitting tokens,
building the next round). The profiler adds its own cost to every op, so the profiled column
sums to more than the timed wall; read shares from it and times from the timed columns.
Writes loop_profile_<tag>.{json,md,png} under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

import sparrow.speculative.generate as loop
from sparrow import fixture
from sparrow.bench import case_prompt, parse_lengths
from sparrow.draft import load_draft
from sparrow.draft.modes import prefill_layers
from sparrow.machine import describe_device, machine_info
from sparrow.speculative.proposers import DraftProposer
from sparrow.speculative.tree import parse_tree
from sparrow.targets import load_target
from sparrow.targets.base import TargetAdapter

PHASES = ("draft", "draft prompt", "verify", "accept", "keep")
PREFILL = "prefill"  # labelled too, so that the forward of a prompt's rest is not a verify
KINDS = ("linear", "attention", "ops", "python")
LINEAR = ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise", "sparrow::native_linear")


def kind(name: str) -> str:
    if name in LINEAR:
        return "linear"
    if "attention" in name:
        return "attention"
    return "ops"


@contextlib.contextmanager
def labelled_phases():
    """Each phase's function wrapped in a record_function range named after the phase."""
    patched = [(TargetAdapter, "prefill", PREFILL),
               (DraftProposer, "propose", "draft"), (DraftProposer, "commit", "draft"),
               (DraftProposer, "start", "draft prompt"), (TargetAdapter, "forward", "verify"),
               (TargetAdapter, "keep", "keep"), (loop, "accept_greedy", "accept"),
               (loop, "accept_sampled", "accept")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]

    def wrap(function, label):
        def wrapped(*args, **kwargs):
            with torch.profiler.record_function(label):
                return function(*args, **kwargs)
        return wrapped

    for owner, name, label in patched:
        setattr(owner, name, wrap(getattr(owner, name), label))
    try:
        yield
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)


def phase_breakdown(events) -> dict[str, dict[str, float]]:
    """Milliseconds per phase and kind from the profiler's events (outermost phase ranges; the
    prefill's are left out)."""
    table = {phase: dict.fromkeys(KINDS, 0.0) for phase in PHASES}

    def walk(event, phase):
        for child in event.cpu_children:
            table[phase][kind(child.name)] += child.self_cpu_time_total / 1e3
            walk(child, phase)

    for event in events:
        if event.name in PHASES and not _inside_phase(event):
            table[event.name]["python"] += event.self_cpu_time_total / 1e3
            walk(event, event.name)
    return table


def _inside_phase(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in PHASES or parent.name == PREFILL:
            return True
        parent = parent.cpu_parent
    return False


def profile_method(target, ids, video, prefix, name, draft, tree, max_new_tokens) -> dict:
    method = draft.mode if draft is not None else "ar"
    run = dict(method=method, draft=draft, tree=tree, max_new_tokens=max_new_tokens, prefix=prefix)
    loop.generate(target, ids, video, **{**run, "max_new_tokens": 8})  # warm-up: packing, kernels
    timed = loop.generate(target, ids, video, **run)
    from torch.profiler import ProfilerActivity, profile

    with labelled_phases(), profile(activities=[ProfilerActivity.CPU]) as profiler:
        began = time.perf_counter()
        profiled = loop.generate(target, ids, video, **run)
        profiled_wall = time.perf_counter() - began
    if profiled.token_ids != timed.token_ids:
        raise RuntimeError(f"{name}: the profiled run decoded another answer than the timed one")
    calls = timed.target_calls
    table = phase_breakdown(profiler.events())
    # the decode phase of the profiled run outside the five ranges: the loop's own Python
    ranges = sum(sum(row.values()) for row in table.values())
    t = timed.timings
    return {
        "method": name, "tree": timed.tree, "calls": calls, "tokens": len(timed.token_ids),
        "tau": (len(timed.token_ids) - 1) / max(1, calls),
        "timed_ms_per_call": {"decode": 1e3 * t.decode_s / calls, "draft": 1e3 * t.draft_s / calls,
                              "verify": 1e3 * t.verify_s / calls,
                              "other": 1e3 * (t.decode_s - t.draft_s - t.verify_s) / calls},
        "profiled_ms_per_call": {phase: {k: v / profiled.target_calls for k, v in row.items()}
                                 for phase, row in table.items()},
        "profiled_loop_ms_per_call": max(0.0, 1e3 * profiled.timings.decode_s - ranges)
        / profiled.target_calls,
        "profiled_wall_s": profiled_wall,
    }


def write_markdown(results: dict, path: Path) -> None:
    lines = [f"# Where the decoding loop's time goes, per target call ({results['device']}, "
             f"{results['date'][:10]})", "", f"`{results['command']}`", "",
             "Timed without the profiler (ms per target call): decode = draft + verify + other.", "",
             "| visual tokens | method | tree | tau | decode | draft | verify | other |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for case in results["cases"]:
        for m in case["methods"]:
            t = m["timed_ms_per_call"]
            lines.append(f"| {case['visual_tokens']:,} | {m['method']} | {m['tree']} | {m['tau']:.2f} | "
                         f"{t['decode']:.1f} | {t['draft']:.1f} | {t['verify']:.1f} | {t['other']:.1f} |")
    lines += ["", "Under the profiler (ms per target call, by phase and kind; the profiler's own cost "
              "included: read shares):", "",
              "| visual tokens | method | phase | linear | attention | ops | python | total |",
              "|---:|---|---|---:|---:|---:|---:|---:|"]
    for case in results["cases"]:
        for m in case["methods"]:
            for phase in PHASES:
                row = m["profiled_ms_per_call"][phase]
                total = sum(row.values())
                if total < 0.05:
                    continue
                lines.append(f"| {case['visual_tokens']:,} | {m['method']} | {phase} | " + " | ".join(
                    f"{row[k]:.1f}" for k in KINDS) + f" | {total:.1f} |")
            lines.append(f"| {case['visual_tokens']:,} | {m['method']} | loop | | | | "
                         f"{m['profiled_loop_ms_per_call']:.1f} | {m['profiled_loop_ms_per_call']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars, labels = [], []
    for case in results["cases"]:
        for m in case["methods"]:
            parts = {f"{phase}: {k}": m["profiled_ms_per_call"][phase][k] for phase in PHASES for k in KINDS}
            parts["loop: python"] = m["profiled_loop_ms_per_call"]
            bars.append(parts)
            labels.append(f"{case['visual_tokens']:,}\n{m['method']}")
    keys = [k for k in bars[0] if any(b[k] > 0.05 for b in bars)]
    fig, axis = plt.subplots(figsize=(max(6, 1.2 * len(bars)), 5))
    bottom = [0.0] * len(bars)
    for i, key in enumerate(keys):
        values = [b[key] for b in bars]
        axis.bar(range(len(bars)), values, bottom=bottom, label=key, color=f"C{i % 10}",
                 hatch="//" if key.endswith("python") else None)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axis.set_xticks(range(len(bars)), labels, fontsize=7)
    axis.set_ylabel("ms per target call (profiled)")
    axis.set_title(f"decoding loop by phase and kind, {results['device']}")
    axis.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafts", default="reference:sparrow", help="comma-separated drafts")
    parser.add_argument("--lengths", nargs="+", default=["0.5k", "25k"], help="visual tokens")
    parser.add_argument("--tree", default="30-4-8")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default=None, help="file name suffix (default reference_<isa>)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    target = load_target("reference")
    drafts = [(Path(fixture.resolve_draft(d)).name, load_draft(fixture.resolve_draft(d), target))
              for d in args.drafts.split(",") if d]
    tree = parse_tree(args.tree)
    layers = tuple(sorted({m for _, d in drafts
                           for m in prefill_layers(d.mode, d.config.visual, d.config.mid_layer)}))
    info = machine_info()
    tag = args.tag or f"reference_{(info.get('cpu_isa') or 'cpu').lower()}"
    given = sys.argv[1:] if argv is None else argv
    results = {"command": " ".join(["python benchmarks/loop_profile.py", *given]),
               "device": describe_device(info), "date": info["date"], "machine": info, "cases": []}
    with torch.no_grad():
        for length in parse_lengths(",".join(args.lengths)):
            case = fixture.reference_cases(target, [length], 1)[0]
            ids, video = case_prompt(target, case)
            prefill = target.prefill(ids, video, layers=layers)
            prefix = target.snapshot()
            methods = [profile_method(target, ids, video, prefix, name, draft, tree, args.max_new_tokens)
                       for name, draft in [("ar", None), *drafts]]
            results["cases"].append({"length": length, "visual_tokens": int(prefill.visual_mask.sum()),
                                     "methods": methods})
            print(json.dumps(results["cases"][-1]["methods"][-1]["timed_ms_per_call"]), file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"loop_profile_{tag}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, stem.with_suffix(".md"))
    write_plot(results, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
