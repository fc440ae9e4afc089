"""`sparrow datagen` and `sparrow train`: the draft-training commands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from sparrow import options
from sparrow.training.config import PRESETS, TrainConfig

DEFAULT_REFERENCE_PROMPTS = 480


def add_commands(sub) -> dict[str, Callable[[argparse.Namespace], int]]:
    gen = sub.add_parser(
        "datagen", help="self-distilled training data: the target answers prompts, states saved",
        description="The target answers prompts itself; prompt + answer and the target states "
        "every draft recipe trains on go to safetensors shards in --out. Resumable: rerun the "
        "same command after an interruption.")
    options.add_target(gen)
    gen.add_argument("--out", required=True, help="output directory (resumed if it holds a run)")
    gen.add_argument("--prompts", help="JSON Lines of {\"question\": ..., \"video\": ..., "
                     "\"num_frames\": ...} (default for the reference target: synthetic videos "
                     "of training seeds and text-only prompts)")
    gen.add_argument("--count", type=int, default=DEFAULT_REFERENCE_PROMPTS,
                     help=f"reference target: how many prompts (default {DEFAULT_REFERENCE_PROMPTS})")
    gen.add_argument("--prompt-seed", type=int, default=0,
                     help="reference target: which prompts (default 0)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="answer sampling temperature (default 0: greedy)")
    gen.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    gen.add_argument("--batch-size", type=int, default=16, help="answers generated at once (default 16)")
    gen.add_argument("--mid-layer", type=int, default=None,
                     help="layer m* whose visual states are saved for IVSB (default L/2)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--from", dest="source", metavar="DIR",
                     help="restate the datagen output DIR with --mid-layer's visual states (same "
                     "prompts and answers, nothing generated) into --out")

    tr = sub.add_parser(
        "train", help="train a draft on datagen output (runs under accelerate: CPU or multi-GPU)",
        description="Train a draft for --target on `sparrow datagen` data. One process, or "
        "several with `accelerate launch -m sparrow.cli train ...` (DDP). Resumes from "
        "--out/checkpoint when rerun. Presets: " + ", ".join(PRESETS) + " (see the README).")
    options.add_target(tr)
    tr.add_argument("--data", required=True, action="append", metavar="DIR",
                    help="datagen output directory (repeatable)")
    tr.add_argument("--out", required=True, help="the draft checkpoint directory to write")
    tr.add_argument("--preset", default="sparrow", choices=list(PRESETS))
    defaults = TrainConfig()
    for name, kind, text in (
        ("visual", str, "what visual positions carry in training: none|last|mid|embed"),
        ("mode", str, "what the draft sees at inference: sparrow (text only) | eagle (all)"),
        ("mid-layer", int, "m* for --visual mid (default: the data's, L/2)"),
        ("mtp", int, "MTP passes"),
        ("feature-weight", float, "SmoothL1 feature loss weight"),
        ("noise", float, "uniform noise amplitude on the fed target states"),
        ("draft-vocab", int, "predict over the N most frequent answer tokens (default: all)"),
        ("lr", float, "peak learning rate"),
        ("warmup", float, "warm-up fraction of the steps"),
        ("epochs", float, "epochs over all the data (stage 2)"),
        ("stage1-epochs", float, "epochs over the text-only samples first (stage 1)"),
        ("batch-size", int, "global batch (split over processes)"),
        ("held-out", float, "fraction of samples held out for the held-out tau"),
        ("max-samples", int, "train on N of the training samples, drawn by key (data-size studies)"),
        ("eval-every", int, "steps between held-out tau evaluations"),
        ("checkpoint-every", int, "steps between checkpoints"),
        ("init", str, "random | target (start from the target's last layer)"),
        ("seed", int, "seed of the initialisation, batches and noise"),
    ):
        default = getattr(defaults, name.replace("-", "_"))
        tr.add_argument(f"--{name}", type=kind, default=None,
                        help=f"{text} (preset's value; default {default})")
    tr.add_argument("--mtp-weights", default=None, help="comma-separated loss weight per MTP pass")
    tr.add_argument("--stop-after", type=int, default=None,
                    help="stop after this many steps in total (rerun to continue)")
    return {"datagen": cmd_datagen, "train": cmd_train}


def cmd_datagen(args: argparse.Namespace) -> int:
    from sparrow import fixture
    from sparrow.errors import DataError
    from sparrow.targets import load_target
    from sparrow.training.datagen import DatagenSettings, datagen
    from sparrow.training.prompts import read_prompts

    out = Path(args.out)
    if args.source and (args.prompts or args.mid_layer is None):
        raise DataError("--from restates existing data: give --mid-layer, and no --prompts")
    target = load_target(args.target, dtype=options.dtype_of(args), device=args.device)
    if args.source:
        from sparrow.training.datagen import restate

        summary = restate(target, args.source, out, args.mid_layer)
        print(json.dumps(summary))
        print(f"restated {summary['samples']} samples with m* = {args.mid_layer} in {out}", file=sys.stderr)
        return 0
    if args.prompts:
        prompts = read_prompts(args.prompts)
    elif fixture.is_reference(args.target):
        prompts = fixture.reference_prompts(args.count, args.prompt_seed, out / "videos")
    else:
        raise DataError(f"--target {args.target}: give --prompts FILE (JSON Lines of questions "
                        "and videos); only the reference target has built-in prompts")
    settings = DatagenSettings(temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, mid_layer=args.mid_layer, seed=args.seed)
    summary = datagen(target, prompts, out, settings)
    print(json.dumps(summary))
    print(f"wrote {summary['samples']} samples ({summary['answer_tokens']} answer tokens, "
          f"{summary['disk_bytes'] / 2**20:.0f} MiB) to {out}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from sparrow.errors import ConfigError
    from sparrow.targets import load_target
    from sparrow.training.config import preset
    from sparrow.training.trainer import train

    weights = None
    if args.mtp_weights:
        try:
            weights = tuple(float(w) for w in args.mtp_weights.split(","))
        except ValueError as error:
            raise ConfigError(f"--mtp-weights {args.mtp_weights}: comma-separated numbers") from error
    names = ("visual", "mode", "mid_layer", "mtp", "feature_weight", "noise", "draft_vocab", "lr",
             "warmup", "epochs", "stage1_epochs", "batch_size", "held_out", "max_samples", "eval_every",
             "checkpoint_every", "init", "seed")
    config = preset(args.preset, mtp_weights=weights, **{n: getattr(args, n) for n in names})
    target = load_target(args.target, dtype=options.dtype_of(args), device=args.device)
    summary = train(target, args.data, args.out, config, stop_after=args.stop_after)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    state = "trained" if summary["finished"] else f"stopped at step {summary['steps']} of"
    print(f"{state} {config.preset} draft ({summary['total_steps']} steps) in {args.out}",
          file=sys.stderr)
    return 0
