"""`sparrow analyze`: the phenomena the method rests on (METHOD.md section 1), measured on a target.

Three measurements, on the same held-out videos as `sparrow bench`:

    removal   how much the target still gets right when its text positions stop seeing the
              video from decoder layer x on (x = 0: the video is never seen; x = L: nothing
              removed, the target itself). Per x, over the videos at `--removal-length`:
              agreement: teacher-forced, the share of the unmodified target's greedy answer
                  tokens that the cut target also ranks first, given the same preceding tokens;
              nll: the cut target's mean negative log-likelihood of that answer;
              score: (targets whose videos have known facts, e.g. the reference's synthetic
                  ones) the key-fact accuracy of the answer the cut target generates greedily.
              Removal is a visibility cut, the model is not modified: at layers >= x an
              attention function that is the engine's own below x hides every visual key from
              the text queries (visual queries keep their normal attention; no text query
              reads their later states). The video is prefilled once per video with nothing
              cut (a text query sees no visual key before the video anyway), and every x
              reruns only the text after it over a copy of that state.
    drift     per layer l, the mean cosine similarity of the hidden state after l layers to the
              input embedding at the same position (l = 0 is 1), separately at visual positions
              and at text positions of the prompt: where visual states stop resembling their
              projector inputs; also centered (each layer's mean state over the prompt
              subtracted), as a few dimensions every position shares can dominate the plain
              cosine of a small model.
    dilution  the share of an EAGLE-full draft's attention that lands on visual positions, per
              length: the draft decodes in eagle mode (every prompt position in its cache) and
              an attention function that is the engine's own records, for every draft query
              after its pass over the prompt, the softmax mass on visual cache slots (mean over
              heads and queries), beside the visual share of the keys (what uniform attention
              would give) and the draft's tau in the same run.

Results go to `--out`: records.jsonl (one record per finished video and measurement: a rerun
resumes), analyze.json, analyze.md, analyze.png (the three panels).
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from sparrow.bench import case_prompt
from sparrow.errors import ConfigError
from sparrow.runtime.attention import TreeMask, no_mask, sparrow_attention
from sparrow.targets.base import PrefixState, TargetAdapter

RECORDS = "records.jsonl"
CUT_NAME = "sparrow-visual-cut"
RECORD_NAME = "sparrow-visual-mass"


# ---- the two attention functions: the engine's own, plus a cut or a record ------------------
@dataclass
class VisualCut:
    """Hide visual keys from text queries in decoder layers >= `layer`.

    visual: (P,) bool over the first P cache slots (the prompt): True at visual positions;
    slots after P (generated tokens) are text."""

    layer: int
    visual: torch.Tensor


def _visibility(q: int, length: int, sparrow_mask: TreeMask | None, device) -> torch.Tensor:
    """(q, length) bool: what each of the q newest cache positions may see (the engine's rule:
    causal when the cache holds only them, else the whole prefix plus `sparrow_mask`)."""
    if sparrow_mask is None:
        if q == 1:
            return torch.ones(1, length, dtype=torch.bool, device=device)
        return torch.ones(q, length, dtype=torch.bool, device=device).tril(length - q)
    visible = torch.ones(q, length, dtype=torch.bool, device=device)
    m = sparrow_mask.visible.shape[1]
    visible[:, length - m:] = sparrow_mask.visible
    return visible


def _slots(visual: torch.Tensor, length: int) -> torch.Tensor:
    """(length,) bool: `visual` (P,) over the first slots, False after (generated tokens)."""
    out = torch.zeros(length, dtype=torch.bool, device=visual.device)
    n = min(length, visual.shape[0])
    out[:n] = visual[:n]
    return out


def cut_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                  scaling: float | None = None, sparrow_mask: TreeMask | None = None,
                  cut: VisualCut | None = None, **kwargs):
    """`sparrow_attention`, except that from layer `cut.layer` on text queries see no visual key."""
    if cut is None or module.layer_idx < cut.layer:
        return sparrow_attention(module, query, key, value, attention_mask, dropout, scaling,
                                 sparrow_mask, **kwargs)
    q, length = query.shape[2], key.shape[2]
    visual = _slots(cut.visual.to(query.device), length)
    visible = _visibility(q, length, sparrow_mask, query.device)
    text_query = ~visual[length - q:]
    visible[text_query] &= ~visual  # text rows: no visual column
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=visible[None, None], scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2), None


@dataclass
class MassRecord:
    """What `record_attention` collects: per draft attention call after the prompt pass, the
    mean softmax mass on visual slots and the visual share of the keys each query sees (what
    uniform attention would put there)."""

    visual: torch.Tensor  # (P,) bool over the draft cache's first slots
    mass: list[float] = field(default_factory=list)
    share: list[float] = field(default_factory=list)


def record_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, sparrow_mask: TreeMask | None = None,
                     record: MassRecord | None = None, **kwargs):
    """`sparrow_attention`; on the side, the attention mass on visual slots into `record`."""
    out = sparrow_attention(module, query, key, value, attention_mask, dropout, scaling,
                            sparrow_mask, **kwargs)
    q, length = query.shape[2], key.shape[2]
    if record is not None and q < length:  # not the causal pass over the prompt itself
        heads, kv_heads = query.shape[1], key.shape[1]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        keys = key.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, T, D)
        scores = (query.float() @ keys.float().transpose(-1, -2)) * scale  # (B, H, q, T)
        visible = _visibility(q, length, sparrow_mask, query.device)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        visual = _slots(record.visual.to(query.device), length)
        record.mass.append(float(weights[..., visual].sum(-1).mean()))
        record.share.append(float(((visible & visual).sum(-1) / visible.sum(-1)).mean()))
    return out


@contextmanager
def attention_function(config, name: str, function: Callable) -> Iterator[None]:
    """Run `config`'s model through `function` (registered as `name`) inside the block; the
    config's own attention implementation comes back after."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, no_mask)  # causality is the functions' own, as the engine's
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def visual_cut(target: TargetAdapter, cut: VisualCut):
    """Inside the block, `target` decodes with `cut` applied (see `cut_attention`)."""
    return attention_function(target.text_config, CUT_NAME, functools.partial(cut_attention, cut=cut))


def recording(draft, record: MassRecord):
    """Inside the block, `draft`'s attention records its visual mass into `record`."""
    return attention_function(draft.layer.self_attn.config, RECORD_NAME,
                              functools.partial(record_attention, record=record))


def truncated(state: PrefixState, length: int) -> PrefixState:
    """The first `length` positions of a prefix state (e.g. up to the end of the video)."""
    return PrefixState(
        input_ids=state.input_ids[:length], keys=[k[:, :, :length] for k in state.keys],
        values=[v[:, :, :length] for v in state.values], hidden=state.hidden[:length],
        visual_mask=state.visual_mask[:length], position_offset=state.position_offset,
        video_fingerprint=state.video_fingerprint,
        layer_hidden={m: h[:length] for m, h in state.layer_hidden.items()})


# ---- the measurements -------------------------------------------------------------------
def default_layers(num_layers: int, step: int = 2) -> list[int]:
    """0, step, 2 step, ..., num_layers (the last: nothing removed)."""
    return sorted({*range(0, num_layers, step), num_layers})


def parse_layers(text: str, num_layers: int) -> list[int]:
    try:
        layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--layers {text!r}: give layer numbers separated by commas") from None
    if not layers or layers[0] < 0 or layers[-1] > num_layers:
        raise ConfigError(f"--layers {text!r}: layers must be in [0, {num_layers}] (the target has "
                          f"{num_layers} decoder layers; {num_layers} = nothing removed)")
    return layers


@torch.no_grad()
def removal(target: TargetAdapter, case, layers: list[int], max_new_tokens: int,
            score: Callable[[object, str], float] | None) -> dict:
    """One video's removal curve (module docstring)."""
    from sparrow.speculative.generate import generate

    ids, video = case_prompt(target, case)
    out = target.prefill(ids, video)
    visual_mask = out.visual_mask
    if not bool(visual_mask.any()):
        raise ConfigError(f"{case.video}: the prompt has no visual positions; analyze needs a video")
    prefix = target.snapshot()
    reference = generate(target, ids, video, max_new_tokens=max_new_tokens, prefix=prefix)
    answer = torch.tensor(reference.token_ids, dtype=torch.long)
    end = int(visual_mask.nonzero()[-1]) + 1  # the video's last slot + 1
    video_prefix = truncated(prefix, end)
    full = torch.cat([ids.reshape(-1).cpu(), answer[:-1]]) if answer.numel() else ids.reshape(-1).cpu()
    prompt_length = ids.reshape(-1).shape[0]
    curve = []
    for layer in layers:
        cut = VisualCut(layer, visual_mask)
        row = {"layer": layer}
        if answer.numel():
            logits = forced_logits(target, full, video, video_prefix, cut)[prompt_length - 1 - end:]
            logp = torch.log_softmax(logits, -1)
            targets = answer.to(logits.device)
            row["agreement"] = float((logits.argmax(-1) == targets).float().mean())
            row["nll"] = float(-logp.gather(1, targets[:, None]).mean())
        with visual_cut(target, cut):
            generated = generate(target, ids, video, max_new_tokens=max_new_tokens, prefix=video_prefix)
        row["identical"] = generated.token_ids == reference.token_ids
        if score is not None:
            row["score"] = score(case, target.tokenizer.decode(generated.token_ids, skip_special_tokens=True))
        curve.append(row)
    record = {"kind": "removal", "length": case.length, "index": case.index,
              "visual_tokens": int(visual_mask.sum()), "answer_tokens": int(answer.numel()),
              "curve": curve}
    if score is not None:
        record["score_full"] = score(case, target.tokenizer.decode(reference.token_ids,
                                                                   skip_special_tokens=True))
    return record


@torch.no_grad()
def forced_logits(target: TargetAdapter, ids: torch.Tensor, video, video_prefix: PrefixState,
                  cut: VisualCut) -> torch.Tensor:
    """(L - P, V) float32 next-token logits at the positions of `ids` (L,) after the P that
    `video_prefix` covers (up to the video's end; restored from it, the rest run under `cut`):
    the rows the cut can change, and no lm_head over the video."""
    with visual_cut(target, cut):
        out = target.prefill(ids, video, prefix=video_prefix)
    return target.lm_head(out.hidden[video_prefix.input_ids.shape[0]:]).float()


@torch.no_grad()
def drift(target: TargetAdapter, case) -> dict:
    """One video's drift profile (module docstring)."""
    ids, video = case_prompt(target, case)
    out = target.prefill(ids, video, layers=tuple(range(target.num_layers + 1)))
    if not bool(out.visual_mask.any()):
        raise ConfigError(f"{case.video}: the prompt has no visual positions; analyze needs a video")
    return {"kind": "drift", "length": case.length, "index": case.index,
            "visual_tokens": int(out.visual_mask.sum()),
            "layers": _drift(out.layer_hidden, out.visual_mask, target.num_layers)}


def _drift(layer_hidden: dict[int, torch.Tensor], visual: torch.Tensor, num_layers: int) -> list[dict]:
    """Per layer: mean cosine of the state to the input embedding, at visual and at text
    positions; and the same centered (each layer's mean state over the prompt subtracted, from
    the state and from the embedding alike): a few dimensions that every position shares (a
    small model's massive activations) can dominate the plain cosine."""
    base = layer_hidden[0].float()
    centered_base = base - base.mean(0)
    rows = []
    for layer in range(num_layers + 1):
        state = layer_hidden[layer].float()
        cos = F.cosine_similarity(state, base, dim=-1)  # (L,)
        centered = F.cosine_similarity(state - state.mean(0), centered_base, dim=-1)
        text = bool((~visual).any())
        rows.append({"layer": layer, "visual": float(cos[visual].mean()),
                     "text": float(cos[~visual].mean()) if text else None,
                     "visual_centered": float(centered[visual].mean()),
                     "text_centered": float(centered[~visual].mean()) if text else None})
    return rows


@torch.no_grad()
def dilution(target: TargetAdapter, draft, case, tree, max_new_tokens: int) -> dict:
    """The EAGLE-full draft's attention mass on visual positions over one answer."""
    from sparrow.draft.modes import prefill_layers
    from sparrow.speculative.generate import generate

    ids, video = case_prompt(target, case)
    config = draft.config
    out = target.prefill(ids, video, layers=prefill_layers("eagle", config.visual, config.mid_layer))
    prefix = target.snapshot()
    record = MassRecord(visual=out.visual_mask)  # eagle mode: draft slot i is prompt position i
    with recording(draft, record):
        result = generate(target, ids, video, method="eagle", draft=draft, tree=tree,
                          max_new_tokens=max_new_tokens, prefix=prefix)
    if not record.mass:
        raise RuntimeError("the draft's attention was not recorded: does it run through "
                           "the engine's attention function?")
    return {"kind": "dilution", "length": case.length, "index": case.index,
            "visual_tokens": int(out.visual_mask.sum()), "prompt_tokens": int(out.visual_mask.shape[0]),
            "mass": statistics.mean(record.mass), "share": statistics.mean(record.share),
            "calls": len(record.mass), "tau": result.tau, "tokens": len(result.token_ids)}


# ---- the run ------------------------------------------------------------------------------
def _key(record: dict) -> tuple:
    return record["kind"], record["length"], record["index"]


def load_records(out: Path) -> list[dict]:
    path = out / RECORDS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_analysis(target: TargetAdapter, removal_cases: list, dilution_cases: list, out: str | Path, *,
                 draft=None, draft_name: str | None = None, layers: list[int], tree, max_new_tokens: int,
                 score: Callable[[object, str], float] | None = None, command: str | None = None,
                 settings: dict | None = None) -> dict:
    """Run every missing measurement into `out`/records.jsonl; returns (and writes) the report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = {_key(r) for r in load_records(out)}
    jobs = [("drift", c) for c in removal_cases] + [("removal", c) for c in removal_cases]
    if draft is not None:
        jobs += [("dilution", c) for c in dilution_cases]
    todo = [(kind, c) for kind, c in jobs if (kind, c.length, c.index) not in done]
    for kind, case in tqdm(todo, desc="analyze", unit="video"):
        began = time.perf_counter()
        if kind == "drift":
            record = drift(target, case)
        elif kind == "removal":
            record = removal(target, case, layers, max_new_tokens, score)
        else:
            record = dilution(target, draft, case, tree, max_new_tokens)
        record["seconds"] = round(time.perf_counter() - began, 1)
        with open(out / RECORDS, "a") as f:
            f.write(json.dumps(record) + "\n")
    return write_report(out, target_name=target.name, command=command, draft=draft_name,
                        settings=settings or {})


def summarize(records: list[dict]) -> dict:
    """Means over videos (with standard errors) of every curve."""
    def mean_se(values: list[float]) -> tuple[float | None, float | None]:
        values = [v for v in values if v is not None]
        if not values:
            return None, None
        se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
        return statistics.mean(values), se

    removed = [r for r in records if r["kind"] == "removal"]
    curve = []
    for layer in sorted({row["layer"] for r in removed for row in r["curve"]}):
        rows = [row for r in removed for row in r["curve"] if row["layer"] == layer]
        entry = {"layer": layer, "videos": len(rows)}
        for name in ("agreement", "nll", "score"):
            entry[name], entry[f"{name}_se"] = mean_se([row.get(name) for row in rows])
        entry["identical"] = sum(bool(row.get("identical")) for row in rows)
        curve.append(entry)
    drifted = [r for r in records if r["kind"] == "drift"]
    profile = []
    for layer in sorted({row["layer"] for r in drifted for row in r["layers"]}):
        rows = [row for r in drifted for row in r["layers"] if row["layer"] == layer]
        profile.append({"layer": layer, **{name: mean_se([row.get(name) for row in rows])[0] for name in
                                           ("visual", "text", "visual_centered", "text_centered")}})
    dilution_rows = []
    diluted = [r for r in records if r["kind"] == "dilution"]
    for length in sorted({r["length"] for r in diluted}):
        group = [r for r in diluted if r["length"] == length]
        mass, mass_se = mean_se([r["mass"] for r in group])
        dilution_rows.append({"length": length,
                              "visual_tokens": statistics.median(r["visual_tokens"] for r in group),
                              "videos": len(group), "mass": mass, "mass_se": mass_se,
                              "share": statistics.mean(r["share"] for r in group),
                              "tau": statistics.mean(r["tau"] for r in group)})
    scores = [r["score_full"] for r in removed if "score_full" in r]
    score_full = mean_se(scores)[0]
    return {"removal": curve, "drift": profile, "dilution": dilution_rows,
            "removal_visual_tokens": (statistics.median(r["visual_tokens"] for r in removed)
                                      if removed else None),
            "removal_videos": len(removed), "score_full": score_full,
            "findings": findings(curve, profile, score_full)}


def findings(curve: list[dict], profile: list[dict], score_full: float | None) -> dict:
    """Where the target stops needing the video: the earliest cut layer x from which every later
    cut leaves every answer identical to the full target's, and from which every later cut keeps
    >= 95% of its key-fact score (or, without scores, of its teacher-forced agreement); where
    visual states leave their inputs: the first layer whose visual cosine (plain, centered) is
    below 0.25."""
    def earliest(holds) -> int | None:
        for i, entry in enumerate(curve):
            if all(holds(e) for e in curve[i:]):
                return entry["layer"]
        return None

    result: dict = {"identical_from": None, "keeps_95": None, "keeps_95_by": None,
                    "visual_cosine_below_0_25": None, "visual_centered_cosine_below_0_25": None}
    if curve:
        result["identical_from"] = earliest(lambda e: e["identical"] == e["videos"])
        if score_full is not None and curve[0].get("score") is not None:
            result["keeps_95"] = earliest(lambda e: e["score"] >= 0.95 * score_full)
            result["keeps_95_by"] = "score"
        elif curve[-1].get("agreement") is not None:
            full = curve[-1]["agreement"]  # the last layer: nothing removed
            result["keeps_95"] = earliest(lambda e: e["agreement"] >= 0.95 * full)
            result["keeps_95_by"] = "agreement"
    for name in ("visual", "visual_centered"):
        below = [e["layer"] for e in profile if e[name] is not None and e[name] < 0.25]
        result[f"{name}_cosine_below_0_25"] = below[0] if below else None
    return result


def write_report(out: Path, **context) -> dict:
    from sparrow.machine import describe_device, machine_info

    report = {**context, "date": date.today().isoformat(), "device": describe_device(machine_info("cpu")),
              **summarize(load_records(out))}
    (out / "analyze.json").write_text(json.dumps(report, indent=1))
    (out / "analyze.md").write_text(markdown(report))
    plot(report, out / "analyze.png")
    return report


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [f"# Phenomena of `{report['target_name']}` ({report['date']}, {report['device']})", ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    if report["removal"]:
        lines += [f"## Removing the video from layer x on "
                  f"({report['removal_visual_tokens']:,.0f} visual tokens, "
                  f"{report['removal_videos']} videos)", "",
                  "Text positions see no visual key in decoder layers >= x (x = 0: never; the last row: "
                  "nothing removed). agreement: share of the full target's greedy answer tokens the cut "
                  "target ranks first (teacher-forced); nll: its mean negative log-likelihood of them; "
                  "score: key-fact accuracy of the cut target's own greedy answer; identical: answers "
                  "equal to the full target's. Mean ± standard error over videos.", "",
                  "| x | agreement | nll | score | identical |", "|---:|---:|---:|---:|---:|"]
        for e in report["removal"]:
            agreement = f"{_f(e['agreement'])} ± {_f(e['agreement_se'])}"
            score = f"{_f(e['score'])} ± {_f(e['score_se'])}" if e.get("score") is not None else "-"
            identical = f"{e['identical']}/{e['videos']}" if "identical" in e else "-"
            lines.append(f"| {e['layer']} | {agreement} | {_f(e['nll'])} | {score} | {identical} |")
    if report["drift"]:
        lines += ["", "## Drift: cosine of each layer's state to the input embedding", "",
                  "Mean over positions, then videos; centered: each layer's mean state over the "
                  "prompt subtracted from the state and from the embedding (a few dimensions shared "
                  "by every position, a small model's massive activations, can dominate the plain "
                  "cosine).", "",
                  "| layer | visual | text | visual, centered | text, centered |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {e['layer']} | {_f(e['visual'])} | {_f(e['text'])} | {_f(e['visual_centered'])} | "
                  f"{_f(e['text_centered'])} |" for e in report["drift"]]
    if report["dilution"]:
        lines += ["", "## Dilution: the EAGLE-full draft's attention on visual positions "
                  f"(`{report['draft']}`)",
                  "", "mass: softmax mass of the draft's decoding queries on visual cache slots (mean over "
                  "heads, queries and calls, then videos); share: visual slots / all slots (what uniform "
                  "attention would give); tau: the draft's in the same run.", "",
                  "| visual tokens | videos | mass | share | tau |", "|---:|---:|---:|---:|---:|"]
        for e in report["dilution"]:
            lines.append(f"| {e['visual_tokens']:,.0f} | {e['videos']} | "
                         f"{_f(e['mass'])} ± {_f(e['mass_se'])} | "
                         f"{_f(e['share'])} | {_f(e['tau'], 2)} |")
    f = report["findings"]
    lines += ["", "## Findings", "",
              f"- earliest x from which every later cut leaves every answer identical: {f['identical_from']}",
              f"- earliest x from which every later cut keeps >= 95% of the full target's "
              f"{f['keeps_95_by']}: {f['keeps_95']}",
              f"- first layer where visual states' cosine to their inputs is below 0.25: "
              f"{f['visual_cosine_below_0_25']} (centered: {f['visual_centered_cosine_below_0_25']})"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the bench extra is not installed: JSON and markdown only
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    removal, drift, diluted = report["removal"], report["drift"], report["dilution"]
    if removal:
        x = [e["layer"] for e in removal]
        axes[0].plot(x, [e["agreement"] for e in removal], "o-", label="agreement (teacher-forced)")
        if any(e.get("score") is not None for e in removal):
            axes[0].plot(x, [e["score"] for e in removal], "s-", label="key-fact score (generated)")
        axes[0].set_xlabel("visual tokens removed from layer x on")
        axes[0].set_ylim(0, 1.02)
        axes[0].legend(fontsize=7)
        axes[0].set_title("removal")
    if drift:
        x = [e["layer"] for e in drift]
        axes[1].plot(x, [e["visual"] for e in drift], "o-", label="visual positions")
        axes[1].plot(x, [e["text"] for e in drift], "s-", label="text positions")
        axes[1].plot(x, [e["visual_centered"] for e in drift], "o--", label="visual, centered")
        axes[1].plot(x, [e["text_centered"] for e in drift], "s--", label="text, centered")
        axes[1].axhline(0.25, color="gray", lw=0.8, ls="--")
        axes[1].set_xlabel("layer")
        axes[1].set_ylabel("cosine to input embedding")
        axes[1].legend(fontsize=7)
        axes[1].set_title("drift")
    if diluted:
        x = [e["visual_tokens"] for e in diluted]
        axes[2].plot(x, [e["mass"] for e in diluted], "o-", label="attention mass on visual")
        axes[2].plot(x, [e["share"] for e in diluted], "--", color="gray", label="visual share of keys")
        axes[2].set_xscale("log")
        axes[2].set_ylim(0, 1.02)
        axes[2].set_xlabel("visual tokens")
        axes[2].legend(fontsize=7)
        axes[2].set_title("EAGLE-full draft: dilution")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(report["target_name"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
