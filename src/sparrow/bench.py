"""`sparrow bench`: plain decoding and every draft on the same held-out videos, same run.

Each video is prefilled once, keeping the target layers' states that any draft reads at visual
positions; that state (`target.snapshot()`) is reused by every method, so the methods differ
only in decoding. `tree` may name
several trees ("auto,30-4-8"): every draft then runs with each, as method `draft@tree`. Per cell
(length, video, temperature, method) one record goes to `cells.jsonl` as it finishes; a rerun
skips the cells already there (an interrupted run resumes with finished cells kept). The
report (`bench.json`, `bench.md`, `bench.png`) is rebuilt from the cells:

    tau      tokens after the first / target calls, over all videos (bonus tokens included;
             AR: 1)
    DSR      decode-phase speedup over AR: AR's decode seconds per token / the method's, per
             video, median over videos (prefill excluded); ESR includes the shared prefill
    draft, verify: milliseconds per target call (draft: its pass over the prompt at the start
             included, which in eagle mode covers every visual token); draft prompt: that
             pass alone, seconds per video (mean); calls: target calls per video (mean)
    other    the rest of the decode phase per call (acceptance, cache bookkeeping, Python)
    limit    the DSR the same draft and verify times would give with nothing else in the
             loop: AR's decode seconds per token / ((draft + verify seconds) / tokens), per
             video, median; achieved / limit = (draft + verify) / decode seconds
    SE       standard error over videos (per-video tau and DSR): stdev / sqrt(videos)
    draft KV the draft's KV cache at the end, MB (its positions x 2 x KV heads x head dim)

Videos and prompts: for the reference target, evaluation seeds (never trained on) rendered
with as many frames as fit each length, asked "Describe the video in detail."; for other
targets, `--prompts FILE` (sparrow.training.prompts), each video sampled to fit the length.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from sparrow.draft.modes import prefill_layers
from sparrow.errors import ConfigError
from sparrow.machine import describe_device
from sparrow.speculative.generate import generate
from sparrow.speculative.sampling import SamplingParams
from sparrow.speculative.tree import parse_tree

CELLS = "cells.jsonl"


def parse_lengths(text: str) -> list[int]:
    """'0.5k,1.5k,6000' -> [500, 1500, 6000] (visual tokens)."""
    lengths = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            value = float(part[:-1]) * 1000 if part.endswith("k") else float(part)
        except ValueError as error:
            raise ConfigError(f"--lengths {text}: {part!r} is not a length like 0.5k or 1500") from error
        if value < 1:
            raise ConfigError(f"--lengths {text}: lengths must be positive")
        lengths.append(int(round(value)))
    return lengths


@dataclass(frozen=True)
class Case:
    """One held-out video (or none) and its question, at one length."""

    length: int
    index: int
    question: str
    video: str | None
    num_frames: int | None


def _key(record: dict) -> tuple:
    return record["length"], record["index"], record["temperature"], record["method"]


def _load_cells(out: Path) -> list[dict]:
    path = out / CELLS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def parse_trees(text: str) -> list[str]:
    """'auto,30-4-8' -> ['auto', '30-4-8'], each checked (sparrow.speculative.tree)."""
    trees = [part.strip() for part in str(text).split(",") if part.strip()]
    if not trees or len(set(trees)) != len(trees):
        raise ConfigError(f"--tree {text}: one tree or distinct comma-separated trees, e.g. auto,30-4-8")
    for tree in trees:
        parse_tree(tree)
    return trees


def _methods(target, drafts: list[str], trees: list[str]) -> list[tuple[str, object, object]]:
    """(name, draft or None, tree) per method: AR once, then every draft with every tree."""
    from sparrow.draft import load_draft

    methods: list[tuple[str, object, object]] = [("ar", None, parse_tree(trees[0]))]
    names = set()
    for directory in drafts:
        name = Path(directory).name
        if name in names or name == "ar":
            raise ConfigError(f"--drafts: two drafts named {name!r}; give the directories distinct names")
        names.add(name)
        draft = load_draft(directory, target)
        for tree in trees:
            methods.append((name if len(trees) == 1 else f"{name}@{tree}", draft, parse_tree(tree)))
    return methods


def run_bench(target, cases: list[Case], drafts: list[str], out: str | Path, *, tree: str,
              temperatures: list[float], max_new_tokens: int, seed: int = 0,
              command: str | None = None) -> dict:
    """Run every missing cell into `out`/cells.jsonl; returns the report (and writes it)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = _methods(target, drafts, parse_trees(tree))
    layers = tuple(sorted({m for _, draft, _ in methods if draft is not None
                           for m in prefill_layers(draft.mode, draft.config.visual, draft.config.mid_layer)}))
    done = {_key(r) for r in _load_cells(out)}
    todo = [(c, t, m) for c in cases for t in temperatures for m, _, _ in methods
            if (c.length, c.index, t, m) not in done]
    bar = tqdm(total=len(todo), desc="bench", unit="run")
    warmed = False
    for case in cases:
        pending = [(t, name, d, spec) for t in temperatures for name, d, spec in methods
                   if (case.length, case.index, t, name) not in done]
        if not pending:
            continue
        ids, video = case_prompt(target, case)
        start = time.perf_counter()
        target.prefill(ids, video, layers=layers)
        prefill_s = time.perf_counter() - start
        prefix = target.snapshot()
        if not warmed:  # first calls pack weights and build kernels: not part of any timing
            for _, draft, spec in methods:
                generate(target, ids, video, method=draft.mode if draft else "ar", draft=draft,
                         tree=spec, max_new_tokens=4, prefix=prefix)
            warmed = True
        for temperature, name, draft, spec in pending:
            sampling = SamplingParams(temperature=temperature, seed=seed + case.index)
            result = generate(target, ids, video, method=draft.mode if draft else "ar", draft=draft,
                              tree=spec, max_new_tokens=max_new_tokens, sampling=sampling, prefix=prefix)
            t = result.timings
            record = {"length": case.length, "index": case.index, "temperature": temperature,
                      "method": name, "mode": result.method, "num_frames": case.num_frames,
                      "visual_tokens": result.num_visual_tokens, "prompt_tokens": result.num_prompt_tokens,
                      "tokens": len(result.token_ids), "target_calls": result.target_calls,
                      "tau": result.tau, "prefill_s": prefill_s, "decode_s": t.decode_s,
                      "draft_s": t.draft_s, "verify_s": t.verify_s, "draft_prefill_s": t.draft_prefill_s,
                      "draft_cache_length": result.draft_cache_length, "tree": result.tree,
                      "draft_kv_bytes": _draft_kv_bytes(draft, result.draft_cache_length),
                      "preset": (draft.config.training or {}).get("preset") if draft else None,
                      "token_ids": result.token_ids}
            with open(out / CELLS, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(length=case.length, method=name, tau=f"{result.tau:.2f}")
    bar.close()
    return write_report(out, tree=tree, target_name=target.name, command=command,
                        max_new_tokens=max_new_tokens)


def case_prompt(target, case: Case):
    """A case's prompt ids (1, L) and its prepared video (None without one)."""
    from sparrow.api import prepare_video
    from sparrow.video.prompt import build_video_prompt

    video = None if case.video is None else prepare_video(target, case.video, num_frames=case.num_frames)
    return build_video_prompt(target.tokenizer, target.config, video, case.question), video


def _draft_kv_bytes(draft, positions: int | None) -> int:
    """Bytes of a one-layer draft's KV cache holding `positions` positions (0 without one)."""
    if draft is None or not positions:
        return 0
    config = draft.config
    element = next(draft.parameters()).element_size()
    return positions * 2 * config.num_key_value_heads * config.head_dim * element


def _se(values: list[float]) -> float | None:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None


def summarize(cells: list[dict]) -> list[dict]:
    """One row per (temperature, length, method) (module docstring)."""
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["temperature"], cell["length"], cell["method"]), []).append(cell)
    ar_cells = {(c["temperature"], c["length"], c["index"]): c for c in cells if c["method"] == "ar"}
    for (temperature, length, method), group in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], kv[0][2] != "ar", kv[0][2])):
        calls = sum(c["target_calls"] for c in group)
        dsr, esr, same, limit, share = [], [], [], [], []
        for c in group:
            ar = ar_cells.get((temperature, length, c["index"]))
            if ar is None or not c["tokens"] or not ar["tokens"]:
                continue
            ar_per_token = ar["decode_s"] / ar["tokens"]
            dsr.append(ar_per_token / (c["decode_s"] / c["tokens"]))
            esr.append((ar["prefill_s"] + ar["decode_s"]) / (c["prefill_s"] + c["decode_s"]))
            same.append(c["token_ids"] == ar["token_ids"])
            spent = c["draft_s"] + c["verify_s"]
            if spent > 0:
                limit.append(ar_per_token / (spent / c["tokens"]))
                share.append(spent / c["decode_s"])
        taus = [(c["tokens"] - 1) / c["target_calls"] for c in group if c["target_calls"]]
        rows.append({
            "temperature": temperature, "length": length, "method": method, "videos": len(group),
            "visual_tokens": round(statistics.mean(c["visual_tokens"] for c in group)),
            # the first token comes from the prefill: the calls produced the rest
            "tau": sum(c["tokens"] - 1 for c in group) / max(1, calls),
            "tau_se": _se(taus),
            "dsr": statistics.median(dsr) if dsr else None,
            "dsr_se": _se(dsr),
            "esr": statistics.median(esr) if esr else None,
            "dsr_limit": statistics.median(limit) if limit else None,
            "achieved_of_limit": statistics.median(share) if share else None,
            "draft_ms": 1000 * sum(c["draft_s"] for c in group) / max(1, calls),
            "verify_ms": 1000 * sum(c["verify_s"] for c in group) / max(1, calls),
            "other_ms": 1000 * sum(c["decode_s"] - c["draft_s"] - c["verify_s"]
                                   for c in group) / max(1, calls),
            "draft_kv_mb": statistics.mean(c.get("draft_kv_bytes", 0) for c in group) / 2**20,
            "preset": group[0].get("preset"),
            "prefill_s": statistics.mean(c["prefill_s"] for c in group),
            "draft_prefill_s": (statistics.mean(c["draft_prefill_s"] for c in group)
                                if all("draft_prefill_s" in c for c in group) else None),
            "calls": calls / len(group),
            "tokens": statistics.mean(c["tokens"] for c in group),
            "identical_to_ar": (sum(same), len(same)) if temperature == 0 else None,
            "draft_cache_length": statistics.mean(c["draft_cache_length"] or 0 for c in group),
        })
    return rows


def write_report(out: Path, **context) -> dict:
    from sparrow.machine import machine_info

    cells = _load_cells(out)
    rows = summarize(cells)
    report = {**context, "machine": machine_info(), "rows": rows}
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(rows, report))
    if rows:
        plot(rows, out / "bench.png")
    return report


# The ablation rows of METHOD.md (MTP / IVSB / VATA), by the preset a draft was trained with.
ABLATION = {"ablation-none": "- - -", "ablation-vata": "- - +", "ablation-mtp-vata": "+ - +",
            "ablation-mtp-ivsb": "+ + -", "sparrow": "+ + +"}


def _x(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" + ("" if se is None else f" ± {se:.2f}")


def markdown(rows: list[dict], context: dict) -> str:
    lines = [f"target {context.get('target_name')}, tree {context.get('tree')}, "
             f"{context.get('max_new_tokens')} new tokens at most; command: `{context.get('command')}`",
             "" if "machine" not in context else
             f"{describe_device(context['machine'])}, {context['machine']['date']}", "",
             "| T | visual tokens | method | tau | DSR (± SE) | ESR | draft ms/call | verify ms/call | "
             "draft prompt s | prefill s | calls/video | identical to AR | videos |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = "" if r["identical_to_ar"] is None else f"{r['identical_to_ar'][0]}/{r['identical_to_ar'][1]}"
        draft_prompt = "-" if r.get("draft_prefill_s") is None else f"{r['draft_prefill_s']:.2f}"
        lines.append(f"| {r['temperature']:g} | {r['visual_tokens']} | {r['method']} | {r['tau']:.2f} | "
                     f"{_x(r['dsr'], r.get('dsr_se'))} | {_x(r['esr'])} | {r['draft_ms']:.1f} | "
                     f"{r['verify_ms']:.1f} | {draft_prompt} | {r['prefill_s']:.1f} | {r['calls']:.1f} | "
                     f"{same} | {r['videos']} |")
    lines += _scaling_tables(rows) + _anatomy_table(rows) + _ablation_tables(rows)
    return "\n".join(lines) + "\n"


def _scaling_tables(rows: list[dict]) -> list[str]:
    """METHOD.md's shape: a method per row, a length per column, tau / DSR in each cell."""
    lines = []
    lengths = sorted({r["length"] for r in rows})
    for temperature in sorted({r["temperature"] for r in rows}):
        mine = {(r["method"], r["length"]): r for r in rows if r["temperature"] == temperature}
        methods = list(dict.fromkeys(r["method"] for r in rows if r["temperature"] == temperature))
        visual = {n: next(r["visual_tokens"] for r in rows if r["length"] == n) for n in lengths}
        lines += ["", f"Scaling, T={temperature:g}: tau / DSR (median over videos)", "",
                  "| method | " + " | ".join(f"{visual[n]:,}" for n in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for method in methods:
            cells = [f"{mine[method, n]['tau']:.2f} / {_x(mine[method, n]['dsr'])}"
                     if (method, n) in mine else "-" for n in lengths]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _anatomy_table(rows: list[dict]) -> list[str]:
    lines = ["", "Where the decode time goes, per target call (T=0 where run; `limit`: the DSR of "
             "draft + verify alone)", "",
             "| visual tokens | method | prefill s | draft ms | verify ms | other ms | calls | tokens | "
             "draft KV MB | DSR | limit | achieved / limit |", "|---" * 12 + "|"]
    temperature = min(r["temperature"] for r in rows)
    for r in rows:
        if r["temperature"] != temperature:
            continue
        share = "-" if r.get("achieved_of_limit") is None else f"{r['achieved_of_limit']:.2f}"
        lines.append(f"| {r['visual_tokens']} | {r['method']} | {r['prefill_s']:.1f} | {r['draft_ms']:.1f} | "
                     f"{r['verify_ms']:.1f} | {r.get('other_ms', 0):.1f} | {r['calls']:.1f} | "
                     f"{r['tokens']:.1f} | {r.get('draft_kv_mb', 0):.2f} | {_x(r['dsr'])} | "
                     f"{_x(r.get('dsr_limit'))} | {share} |")
    return lines


def _ablation_tables(rows: list[dict]) -> list[str]:
    """METHOD.md's ablation table (tau), for each temperature and tree whose methods include
    at least two drafts trained with its presets."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        if r.get("preset") in ABLATION:
            tree = r["method"].partition("@")[2]
            groups.setdefault((r["temperature"], tree), {})[(r["preset"], r["length"])] = r
    lines = []
    for (temperature, tree), mine in sorted(groups.items()):
        presets = [p for p in ABLATION if any(key[0] == p for key in mine)]
        if len(presets) < 2:
            continue
        lengths = sorted({key[1] for key in mine})
        visual = {n: next(r["visual_tokens"] for (p, m), r in mine.items() if m == n) for n in lengths}
        title = f"Ablation, T={temperature:g}{', tree ' + tree if tree else ''}: tau (± SE over videos)"
        lines += ["", title, "",
                  "| MTP IVSB VATA | preset | " + " | ".join(f"{visual[n]:,}" for n in lengths) + " |",
                  "|---|---|" + "---|" * len(lengths)]
        for preset in presets:
            cells = []
            for n in lengths:
                r = mine.get((preset, n))
                cells.append("-" if r is None else f"{r['tau']:.2f}" + (
                    "" if r.get("tau_se") is None else f" ± {r['tau_se']:.2f}"))
            lines.append(f"| {ABLATION[preset]} | {preset} | " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """tau (top) and DSR ± SE (bottom) against visual tokens, a column per tree, a colour per
    draft, solid at the lowest temperature and dashed above it (AR is the DSR = 1 line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drafts = [r for r in rows if r["method"] != "ar"]
    trees = list(dict.fromkeys(r["method"].partition("@")[2] for r in drafts)) or [""]
    names = list(dict.fromkeys(r["method"].partition("@")[0] for r in drafts))
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    temperatures = sorted({r["temperature"] for r in rows})
    fig, axes = plt.subplots(2, len(trees), figsize=(5 * len(trees), 7), squeeze=False, sharex=True,
                             sharey="row")
    for column, tree in enumerate(trees):
        top, bottom = axes[0][column], axes[1][column]
        for name in names:
            for temperature in temperatures:
                method = f"{name}@{tree}" if tree else name
                mine = [r for r in drafts if r["method"] == method and r["temperature"] == temperature]
                if not mine:
                    continue
                style = {"color": colours[name], "ls": "-" if temperature == temperatures[0] else "--",
                         "marker": "o" if temperature == temperatures[0] else "^",
                         "label": f"{name} T={temperature:g}"}
                xs = [r["visual_tokens"] for r in mine]
                top.plot(xs, [r["tau"] for r in mine], **style)
                bottom.errorbar(xs, [r["dsr"] or 0 for r in mine], capsize=2,
                                yerr=[r.get("dsr_se") or 0 for r in mine], **style)
        top.set_title(f"tree {tree}" if tree else "")
        top.set_ylabel("tau (tokens per target call)")
        bottom.set_ylabel("DSR (decode speedup over AR)")
        bottom.axhline(1.0, color="grey", lw=0.8)
        bottom.set_xlabel("visual tokens")
        for axis in (top, bottom):
            axis.set_xscale("log")
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cases_from_prompts(target, prompts, lengths: list[int]) -> list[Case]:
    """Cases of a prompts file: each video sampled with as many frames as fit each length."""
    from sparrow.video.io import read_video
    from sparrow.video.processing import frames_for_budget

    cases = []
    for length in lengths:
        for index, prompt in enumerate(prompts):
            frames = None
            if prompt.video is not None:
                clip = read_video(prompt.video, num_frames=1)
                height, width = clip.frames.shape[1:3]
                frames = frames_for_budget(target.config, target.processor_config, length, height, width,
                                           max_frames=100_000)
            cases.append(Case(length, index, prompt.question, prompt.video, frames))
    return cases
