"""Train the reference target's eyes: `python -m sparrow.reference.train RUN_DIR ...`.

The stages, in order (`--stage all`), each in its own module of this package:

1. `eyes` (`eyes.py`): the vision tower alone, on the generator's ground truth per 2x2 block.
1b. `align` (`align.py`): the projector alone, its visual tokens regressed onto SmolLM2's word
   embeddings of what they show.
2. `caption` (`caption.py`): the whole model (projector, newline, LoRA on SmolLM2) on
   conversations about videos of 4 to 64 frames rendered on the fly (`batches.py`).
2b. `long` (`long.py`): the caption stage continued on long clips, with PoSE positions and, for
   the longest clips, a frozen prefix.
3. `export` (`model.export`): the shipped weights of the last language-model stage that ran.

`corpus` (`data.py`) builds the eyes and align stages' shards first. Each stage resumes exactly
(`checkpoints.py`: checkpoints every `--save-every` steps, written atomically; the batch of step
s depends on (seed, s) only); `--continue-from WEIGHTS` starts a run directory from an exported
file and goes on with its last language-model stage (a sitting, `checkpoints.continue_from`).

Devices: the eyes and align stages run on the CPU; the language-model stages take `--device`
(e.g. cuda: bf16 autocast there) and `--workers N` processes that render and tokenize batches
ahead of the step.

Seeds: training videos use seeds below `EVAL_SEED_START`; validation and `sparrow eval-target`
use seeds from `EVAL_SEED_START` up, never trained on (`data.py`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sparrow.reference import assembly
from sparrow.reference.train import data
from sparrow.reference.train.align import train_align
from sparrow.reference.train.batches import frame_spec, frame_weights
from sparrow.reference.train.caption import train_caption
from sparrow.reference.train.checkpoints import continue_from
from sparrow.reference.train.eyes import EYES_READS, train_eyes
from sparrow.reference.train.long import LONG_EVAL_FRAMES, LONG_FRAMES, LONG_POSE_REACH
from sparrow.reference.train.model import export


def position_step(text: str) -> float:
    """`--video-position-step` "0.25" -> 0.25, checked as `sparrow.targets.llava` checks it."""
    from sparrow.targets.llava import VIDEO_POSITION_STEP, checked_position_step

    try:
        return checked_position_step(float(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace(VIDEO_POSITION_STEP, "the step")) from error



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sparrow.reference.train",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run directory (corpus, checkpoints, logs)")
    parser.add_argument("--stage", default="all",
                        choices=("corpus", "eyes", "align", "caption", "long", "export", "all"))
    parser.add_argument("--train-shards", type=int, default=48,
                        help=f"{data.SHARD_VIDEOS} videos each (eyes and align stages; fewer let the "
                             "tower memorise their frames: MODEL_CARD.md)")
    parser.add_argument("--eyes-steps", type=int, default=3000)
    parser.add_argument("--eyes-batch", type=int, default=128, help="frames per step")
    parser.add_argument("--eyes-lr", type=float, default=1e-3)
    parser.add_argument("--eyes-read", choices=EYES_READS, default=EYES_READS[0],
                        help="what the eyes heads read: every patch of a 2x2 block with the block's "
                             "labels, or each block's mean state")
    parser.add_argument("--align-steps", type=int, default=1000)
    parser.add_argument("--align-lr", type=float, default=1e-3)
    parser.add_argument("--caption-steps", type=int, default=3000)
    parser.add_argument("--caption-tokens", type=int, default=2000,
                        help="tokens per caption step (visual + text; conversations are added up to it)")
    parser.add_argument("--lr", type=float, default=3e-4, help="LoRA learning rate")
    parser.add_argument("--projector-lr", type=float, default=2e-4)
    parser.add_argument("--long-steps", type=int, default=200, help="long-clip steps (0: skip the stage)")
    parser.add_argument("--long-lr", type=float, default=1.5e-4, help="LoRA learning rate, long stage")
    parser.add_argument("--long-frames", type=frame_weights, default=LONG_FRAMES, metavar="F:W,...",
                        help="long stage: clip lengths in frames and their weights (default "
                             + frame_spec(LONG_FRAMES) + ")")
    parser.add_argument("--long-projector-lr", type=float, default=1e-4)
    parser.add_argument("--long-pose-reach", type=int, default=LONG_POSE_REACH, metavar="POSITIONS",
                        help="long stage: half the rows get position ids spread up to POSITIONS "
                             "(PoSE skip offsets: 25k-token distances met in ~6k-token steps; default "
                             "%(default)s); 0: consecutive positions")
    parser.add_argument("--video-position-step", type=position_step, default=assembly.VIDEO_POSITION_STEP,
                        metavar="STEP",
                        help="how far each visual token advances the rotary position in the language-model "
                             "stages, and what the export records for inference (default %(default)s: a "
                             "frame's 16 tokens span 4 positions; 1: plain LLaVA positions)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=250, help="caption eval period (0: never)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu",
                        help="torch device of the language-model stages (caption, long), e.g. cuda")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes that build the language-model stages' batches ahead (0: none; "
                             "worth it beside a GPU, not beside a CPU's own steps)")
    parser.add_argument("--out", type=Path, default=assembly.WEIGHTS_FILE,
                        help="where export writes the shipped weights")
    parser.add_argument("--continue-from", type=Path, metavar="WEIGHTS",
                        help="start the run directory from an exported weights file (e.g. the shipped "
                             "one) and go on with its last language-model stage: no eyes / align stages")
    parser.add_argument("--lora-from", type=Path, metavar="WEIGHTS",
                        help="start the caption stage's LoRA factors from an exported weights file of the "
                             "same --rank (e.g. the shipped one) instead of from zero: new eyes, the old "
                             "adapter (the tower, projector and newline stay this run's)")
    return parser



def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.workers < 0:
        raise SystemExit(f"--workers {args.workers}: give 0 (none) or more")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this machine has no CUDA device (torch "
                         f"{torch.__version__}); leave --device out to train on the CPU")
    torch.set_num_threads(args.threads)
    args.run.mkdir(parents=True, exist_ok=True)
    if args.continue_from and args.lora_from:
        raise SystemExit("--lora-from starts a new caption stage; --continue-from goes on with the file's "
                         "own stage (its LoRA included): give one of them")
    continued = None  # the stage a --continue-from file goes on with
    if args.continue_from:
        if args.stage in ("corpus", "eyes", "align"):
            raise SystemExit("--continue-from starts after the eyes and align stages, "
                             f"not at --stage {args.stage}")
        continued = continue_from(args.continue_from, args.run, args.rank, args.video_position_step,
                                  args.long_pose_reach)
        if continued == "long" and args.stage == "caption":
            raise SystemExit(f"--continue-from {args.continue_from}: it is past its caption stage; "
                             "go on with --stage long (and a larger --long-steps)")
        print(f"{args.run}: continuing the {continued} stage of {args.continue_from}", flush=True)
    elif args.stage in ("corpus", "eyes", "align", "all"):
        train, val = data.ensure_corpus(args.run / "corpus", args.train_shards)
    if args.stage in ("eyes", "all") and not args.continue_from:
        train_eyes(args.run, train, val, args.eyes_steps, args.eyes_batch, args.eyes_lr, args.seed,
                   args.save_every * 4, args.eval_every, read=args.eyes_read)
    if args.stage in ("align", "all") and not args.continue_from:
        train_align(args.run, train, val, args.align_steps, args.eyes_batch, args.align_lr, args.seed,
                    args.eval_every)
    if args.stage in ("caption", "all") and continued != "long":  # a long-stage file's caption stage is over
        train_caption(args.run, args.caption_steps, args.caption_tokens, args.lr, args.projector_lr,
                      args.rank, args.seed, args.save_every, args.eval_every, device=args.device,
                      workers=args.workers, lora_weights=args.lora_from,
                      video_position_step=args.video_position_step)
    if args.stage in ("long", "all") and args.long_steps:
        train_caption(args.run, args.long_steps, args.caption_tokens, args.long_lr, args.long_projector_lr,
                      args.rank, args.seed, args.save_every, args.eval_every // 2, stage="long",
                      frames=args.long_frames, eval_frames=LONG_EVAL_FRAMES, warmup=10,
                      pose_reach=args.long_pose_reach, device=args.device, workers=args.workers,
                      video_position_step=args.video_position_step)
    if args.stage in ("export", "all"):
        print(f"wrote {export(args.run, args.out)}")
