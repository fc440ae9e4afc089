"""How well a target describes videos: key-fact accuracy against the synthetic ground truth.

`sparrow eval-target --target reference --lengths 512,1536,6144,17408,25600` renders, for each
visual-token length, videos from evaluation seeds (never used in training:
`synthetic.EVAL_SEED_START` and up) with as many frames as fit the length, asks the target
"Describe the video in detail." (greedy), and scores each answer with
`synthetic.score_description`. It also reports how repetitive the answers are (distinct 4-gram
share: a target that loops at long lengths would inflate speculative acceptance) and what the
prefill cost.

`--baseline OTHER.jsonl` (another checkpoint's records, e.g. the shipped results) pairs the
videos both answered, by length and seed, and reports the mean difference with its standard
error: differences between checkpoints are small next to the spread between videos, so they are
read paired.

Every finished (length, seed) is appended to `<out>.jsonl` as it completes, so an interrupted
run (a 25k-token prefill takes minutes on a CPU) resumes where it stopped; the summary
(`<out>.json`, `<out>.md`, `<out>.png`) is rewritten after each one.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

from tqdm.auto import tqdm

from sparrow.errors import ConfigError
from sparrow.machine import describe_device, machine_info
from sparrow.reference import synthetic
from sparrow.targets import TargetAdapter

DEFAULT_LENGTHS = (512, 1536, 6144, 17408, 25600)
PROMPT = "Describe the video in detail."
LONG = 8192  # lengths above this use `long_videos` videos (their prefills take minutes on a CPU)
FRAME_SIZE = 128
FPS = 8.0


@dataclass
class Sample:
    length: int  # the requested visual-token length
    seed: int
    num_frames: int
    num_visual_tokens: int
    score: float
    correct: int
    total: int
    hallucinated: int
    invented_events: int  # of `hallucinated`, the events (the rest: invented shapes)
    by_kind: dict  # kind -> [correct, total]
    new_tokens: int
    distinct_4grams: float  # distinct / total word 4-grams of the answer (1.0: no repetition)
    prefill_s: float
    decode_s: float
    text: str
    model: str = ""  # the checkpoint that answered (a resumed run ignores other models' records)


def distinct_ngrams(text: str, n: int = 4) -> float:
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def frames_for_length(target: TargetAdapter, length: int) -> int:
    from sparrow.video.processing import frames_for_budget

    frames = frames_for_budget(target.config, target.processor_config, length, FRAME_SIZE, FRAME_SIZE,
                               max_frames=100_000)
    if frames < 4:
        raise ConfigError(f"--lengths {length}: fewer than 4 frames fit; use at least "
                          f"{_tokens(target, 4)} visual tokens")
    return frames


def _tokens(target: TargetAdapter, frames: int) -> int:
    from sparrow.video.processing import count_visual_tokens

    return count_visual_tokens(target.config, target.processor_config, frames, FRAME_SIZE, FRAME_SIZE)


def eval_scene(seed: int, num_frames: int) -> synthetic.Scene:
    """The evaluation scene of `seed` at `num_frames` frames: what `video_for` renders and scores."""
    return synthetic.generate_scene(seed, num_frames, FRAME_SIZE, FRAME_SIZE, FPS)


def video_for(seed: int, num_frames: int, cache: Path) -> tuple[Path, synthetic.VideoFacts]:
    """The evaluation video of `seed` at `num_frames` frames (rendered once into `cache`)."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{seed}-{num_frames}.mp4"
    scene = eval_scene(seed, num_frames)
    if not path.is_file():  # evaluations running side by side may render it at once: each its own file
        partial = cache / f"{seed}-{num_frames}.{os.getpid()}.partial.mp4"
        synthetic.write_scene(scene, partial)
        os.replace(partial, path)
    return path, synthetic.scene_facts(scene)


def evaluate_one(target: TargetAdapter, length: int, seed: int, cache: Path, max_new_tokens: int) -> Sample:
    from sparrow.api import answer, prepare_video

    num_frames = frames_for_length(target, length)
    path, facts = video_for(seed, num_frames, cache)
    video = prepare_video(target, path, num_frames=num_frames)
    result = answer(target, PROMPT, video, max_new_tokens=max_new_tokens)
    score = synthetic.score_description(result.text, facts)
    r = result.result
    return Sample(
        length=length, seed=seed, num_frames=num_frames, num_visual_tokens=r.num_visual_tokens,
        score=score["score"], correct=score["correct"], total=score["total"],
        hallucinated=score["hallucinated"], by_kind=score["by_kind"], new_tokens=len(r.token_ids),
        distinct_4grams=distinct_ngrams(result.text), prefill_s=r.timings.prefill_s,
        decode_s=r.timings.decode_s, text=result.text, model=_model_id(target),
        invented_events=score["invented_events"],
    )


def _model_id(target: TargetAdapter) -> str:
    """The checkpoint behind `target` (for `reference`: its cache directory, named by the
    weights' hash), so results of retrained weights never mix with older ones."""
    return Path(str(getattr(target.model.config, "_name_or_path", "") or target.name)).name


def summarize(samples: list[Sample]) -> list[dict]:
    """One row per length: mean score and the rest, with per-kind accuracy."""
    rows = []
    for length in sorted({s.length for s in samples}):
        group = [s for s in samples if s.length == length]
        kinds: dict[str, list[int]] = {}
        for s in group:
            for kind, (correct, total) in s.by_kind.items():
                kinds.setdefault(kind, [0, 0])
                kinds[kind][0] += correct
                kinds[kind][1] += total
        rows.append({
            "length": length,
            "num_visual_tokens": group[0].num_visual_tokens,
            "num_frames": group[0].num_frames,
            "videos": len(group),
            "score": statistics.mean(s.score for s in group),
            "score_min": min(s.score for s in group),
            "score_max": max(s.score for s in group),
            "hallucinated_per_video": statistics.mean(s.hallucinated for s in group),
            "invented_events_per_video": statistics.mean(s.invented_events for s in group),
            "new_tokens": statistics.median(s.new_tokens for s in group),
            "distinct_4grams": statistics.mean(s.distinct_4grams for s in group),
            "prefill_s": statistics.median(s.prefill_s for s in group),
            "by_kind": {k: round(c / t, 3) if t else None for k, (c, t) in sorted(kinds.items())},
        })
    return rows


def _read_samples(path: Path) -> list[Sample]:
    """The samples in a resume log (`.jsonl`, one record a line) or a report (`.json`)."""
    if path.suffix == ".json":
        records = json.loads(path.read_text())["samples"]
    else:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in records:
        if "invented_events" not in r:  # written before events were counted apart: count them now
            facts = synthetic.scene_facts(eval_scene(r["seed"], r["num_frames"]))
            r["invented_events"] = synthetic.score_description(r["text"], facts)["invented_events"]
    return [Sample(**r) for r in records]


def load_records(path: Path, exclude_model: str = "") -> list[Sample]:
    """The samples of an earlier run (`.jsonl` records or the `.json` summary) of one checkpoint,
    leaving out `exclude_model`'s (the checkpoint being evaluated)."""
    path = Path(path)
    try:
        samples = _read_samples(path)
    except FileNotFoundError:
        raise ConfigError(f"--baseline {path}: no such file; give an eval-target .jsonl or .json") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--baseline {path}: not eval-target records ({e})") from None
    samples = [s for s in samples if s.model != exclude_model]
    models = sorted({s.model for s in samples})
    if len(models) != 1:
        what = (f"records of {len(models)} checkpoints ({', '.join(models)})" if models
                else "no other checkpoint's records")
        raise ConfigError(f"--baseline {path}: holds {what}; give a file with one checkpoint's records")
    return samples


def paired_difference(samples: list[Sample], baseline: list[Sample]) -> list[dict]:
    """Per length, over the videos (seeds) both answered: mean score of each, the mean paired
    difference and its standard error, and on how many videos each scored higher."""
    base = {(s.length, s.seed): s.score for s in baseline}
    rows = []
    for length in sorted({s.length for s in samples}):
        pairs = [(s.score, base[length, s.seed]) for s in samples
                 if s.length == length and (length, s.seed) in base]
        if not pairs:
            continue
        diffs = [a - b for a, b in pairs]
        rows.append({
            "length": length,
            "num_visual_tokens": next(s.num_visual_tokens for s in samples if s.length == length),
            "videos": len(pairs),
            "score": statistics.mean(a for a, _ in pairs),
            "baseline_score": statistics.mean(b for _, b in pairs),
            "difference": statistics.mean(diffs),
            "standard_error": statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None,
            "higher": sum(d > 0 for d in diffs),
            "lower": sum(d < 0 for d in diffs),
        })
    return rows


def write_report(out: Path, samples: list[Sample], meta: dict, baseline: list[Sample] | None = None) -> None:
    rows = summarize(samples)
    paired = paired_difference(samples, baseline) if baseline else []
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows,
                                                    **({"baseline_rows": paired} if baseline else {}),
                                                    "samples": [asdict(s) for s in samples]}, indent=1))
    kinds = sorted({k for row in rows for k in row["by_kind"]})
    lines = [
        f"# Key-fact accuracy of `{meta['target']}` ({meta['date']}, {meta['device']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Prompt: \"{PROMPT}\" (greedy, at most {meta['max_new_tokens']} new tokens); videos from "
        f"evaluation seeds {synthetic.EVAL_SEED_START}+ (never trained on), {FRAME_SIZE}x{FRAME_SIZE} at "
        f"{FPS:g} fps, as many frames as fit each length. Score = correct key facts / (facts + "
        "hallucinated objects or events), per video, averaged.",
        "",
        "| visual tokens | frames | videos | score (mean) | min | max | hallucinated / video | "
        "of which events | answer tokens (median) | distinct 4-grams | prefill s (median) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['num_visual_tokens']:,} | {r['num_frames']} | {r['videos']} | {r['score']:.3f} | "
            f"{r['score_min']:.2f} | {r['score_max']:.2f} | {r['hallucinated_per_video']:.2f} | "
            f"{r['invented_events_per_video']:.2f} | "
            f"{r['new_tokens']:.0f} | {r['distinct_4grams']:.2f} | {r['prefill_s']:.1f} |"
        )
    lines += ["", "Accuracy per kind of fact:", "",
              "| visual tokens | " + " | ".join(kinds) + " |",
              "|---:|" + "---:|" * len(kinds)]
    for r in rows:
        cells = [f"{r['by_kind'][k]:.2f}" if r["by_kind"].get(k) is not None else "-" for k in kinds]
        lines.append(f"| {r['num_visual_tokens']:,} | " + " | ".join(cells) + " |")
    if baseline:
        lines += ["", f"Against `{meta['baseline']['model']}` ({meta['baseline']['path']}), paired by video "
                  "(the same seeds at the same length):", "",
                  "| visual tokens | videos | this | baseline | difference | standard error | "
                  "higher / lower |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in paired:
            se = f"{r['standard_error']:.3f}" if r["standard_error"] is not None else "-"
            lines.append(f"| {r['num_visual_tokens']:,} | {r['videos']} | {r['score']:.3f} | "
                         f"{r['baseline_score']:.3f} | {r['difference']:+.3f} | {se} | "
                         f"{r['higher']} / {r['lower']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the bench extra is not installed: JSON and markdown only
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["num_visual_tokens"] for r in rows], [r["score"] for r in rows], "o-")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("visual tokens")
    ax.set_ylabel("key-fact accuracy")
    ax.set_title(f"{meta['target']}: describing unseen synthetic videos")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


def evaluate(target: TargetAdapter, lengths: list[int], out: Path, videos: int = 20, long_videos: int = 3,
             max_new_tokens: int = 256, cache: Path | None = None, command: str = "",
             progress: bool = True, baseline: Path | None = None) -> list[dict]:
    """Run (or resume) the evaluation; returns the summary rows (also written to `out`.*), with
    the paired comparison against `baseline`'s records (see `paired_difference`) in the report."""
    out = Path(out)
    base = load_records(baseline, exclude_model=_model_id(target)) if baseline else None
    out.parent.mkdir(parents=True, exist_ok=True)
    for length in lengths:
        frames_for_length(target, length)  # fail fast on an impossible length
    record = out.with_suffix(".jsonl")
    done = [s for s in (_read_samples(record) if record.is_file() else []) if s.model == _model_id(target)]
    have = {(s.length, s.seed) for s in done}
    jobs = [(length, synthetic.EVAL_SEED_START + i) for length in lengths
            for i in range(long_videos if length > LONG else videos)]
    todo = [job for job in jobs if job not in have]
    if cache is None:
        from sparrow.home import cache_home

        cache = cache_home() / "eval-videos"
    machine = machine_info(target.device)
    meta = {"target": target.name, "date": date.today().isoformat(), "command": command,
            "device": describe_device(machine), "machine": machine, "max_new_tokens": max_new_tokens,
            "prompt": PROMPT}
    if base:
        meta["baseline"] = {"path": str(baseline), "model": base[0].model}
    samples = [s for s in done if (s.length, s.seed) in set(jobs)]
    for length, seed in tqdm(todo, desc="eval-target", unit="video", disable=not progress):
        began = time.perf_counter()
        sample = evaluate_one(target, length, seed, cache, max_new_tokens)
        with record.open("a") as f:
            f.write(json.dumps(asdict(sample)) + "\n")
        samples.append(sample)
        write_report(out, samples, meta, base)
        if progress:
            tqdm.write(f"{sample.num_visual_tokens} visual tokens, seed {seed}: score {sample.score:.2f} "
                       f"({time.perf_counter() - began:.0f} s)")
    if samples and not todo:
        write_report(out, samples, meta, base)
    return summarize(samples)


# ---- the `sparrow eval-target` command ------------------------------------------------------
def add_command(subparsers) -> dict:
    """Add `eval-target` to the `sparrow` parser (through `sparrow.fixture`)."""
    from sparrow import options

    ev = subparsers.add_parser("eval-target", help="key-fact accuracy of a target's video "
                               "descriptions at several visual-token lengths (synthetic videos, "
                               "unseen seeds)")
    options.add_target(ev)
    ev.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                    help="visual-token lengths, comma-separated (default %(default)s)")
    ev.add_argument("--videos", type=int, default=20, help=f"videos per length up to {LONG} tokens")
    ev.add_argument("--long-videos", type=int, default=3,
                    help=f"videos per length above {LONG} tokens")
    ev.add_argument("--max-new-tokens", type=int, default=options.DEFAULT_MAX_NEW_TOKENS)
    ev.add_argument("--out", default="eval-target",
                    help="results path without suffix: writes .json, .md, .png and .jsonl (resume log)")
    ev.add_argument("--baseline", metavar="RECORDS",
                    help="another checkpoint's eval-target records (.jsonl or .json): the report adds "
                    "the score difference paired by video, with its standard error")
    return {"eval-target": run_command}


def run_command(args) -> int:
    import sys

    from sparrow import options
    from sparrow.targets import load_target

    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--lengths {args.lengths!r}: give integers separated by commas") from None
    if not lengths or min(lengths) <= 0 or args.videos < 1 or args.long_videos < 1:
        raise ConfigError("--lengths must be positive and --videos / --long-videos at least 1")
    target = load_target(args.target, dtype=options.dtype_of(args), device=args.device)
    invoked = Path(sys.argv[0]).name in ("sparrow", "cli.py")
    command = "sparrow " + " ".join(sys.argv[1:]) if invoked else ""
    rows = evaluate(target, lengths, Path(args.out), videos=args.videos, long_videos=args.long_videos,
                    max_new_tokens=args.max_new_tokens, command=command,
                    baseline=Path(args.baseline) if args.baseline else None)
    for row in rows:
        print(f"{row['num_visual_tokens']:>7,} visual tokens ({row['num_frames']} frames, "
              f"{row['videos']} videos): key-fact accuracy {row['score']:.3f}")
    print(f"wrote {args.out}.json / .md / .png")
    return 0
