"""Defaults and options shared by the commands, the Python API and the server: one source.

The `sparrow` subcommands build their common flags from the `add_*` functions here, and
`sparrow.api`, `sparrow serve` and `sparrow chat` read the same defaults, so a flag means the
same thing, with the same default, wherever it appears.
"""

from __future__ import annotations

import argparse
import os

from sparrow.errors import ConfigError, SparrowError
from sparrow.speculative.generate import DEFAULT_MAX_NEW_TOKENS, METHODS
from sparrow.speculative.sampling import GREEDY, SamplingParams

# METHODS, DEFAULT_MAX_NEW_TOKENS and DEFAULT_TREE are the decoding loop's own, re-exported here.
DEFAULT_NUM_FRAMES = 8  # frames sampled uniformly when neither a count nor an fps is given
DTYPES = ("float32", "bfloat16", "float16")
TREE_HELP = ("draft tree total_tokens-depth-top_k, e.g. 30-4-8, or auto (default): the fastest tree for "
             "the draft at the request's length, from costs measured on this machine")


def add_target(parser: argparse.ArgumentParser) -> None:
    from sparrow.targets.tiny import FAMILIES

    parser.add_argument(
        "--target", required=True,
        help="checkpoint directory of a supported video LLM, 'reference' (the built-in reference "
        "video LLM: SmolLM2-135M with eyes trained on synthetic video), reference:WEIGHTS (that "
        "model with other trained eyes, e.g. a training checkpoint), or tiny:<family> "
        f"(a tiny random model: {', '.join('tiny:' + f for f in FAMILIES)})",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="model dtype (default float32: half precision is slow on CPUs)")


def add_decoding(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft", help="draft checkpoint directory (needed by sparrow/eagle), or "
                        "reference:sparrow / reference:eagle (the drafts shipped for the reference target)")
    parser.add_argument("--method", default=None, choices=METHODS,
                        help="decoding method (default: the draft's own mode with --draft, else ar)")
    parser.add_argument("--tree", default="auto", help=TREE_HELP)


def add_video(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video", help="video file (any container/codec PyAV reads)")
    parser.add_argument("--num-frames", type=int, default=None,
                        help=f"frames sampled uniformly over the video (default {DEFAULT_NUM_FRAMES})")
    parser.add_argument("--fps", type=float, default=None,
                        help="sample this many frames per second instead of --num-frames")


def add_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"answer length limit (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--temperature", type=float, default=GREEDY.temperature,
                        help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=GREEDY.top_p,
                        help="nucleus sampling (default 1 = off)")
    parser.add_argument("--top-k", type=int, default=GREEDY.top_k,
                        help="top-k sampling (default 0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")


def method_of(args: argparse.Namespace) -> str | None:
    """The decoding method the flags ask for, checked before anything is loaded; None: the
    mode the draft (`--draft`) was trained for."""
    method = args.method or (None if args.draft else "ar")
    if method not in ("ar", None) and not args.draft:
        raise ConfigError(f"--method {method} needs --draft DIR (create one with draft-init)")
    return method


def check_video(args: argparse.Namespace) -> None:
    if args.num_frames is not None and args.fps is not None:
        raise ConfigError("give --num-frames or --fps, not both")
    if args.video is not None and not os.path.isfile(args.video):
        raise SparrowError(f"--video {args.video}: file not found; check the path")


def sampling_of(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          seed=args.seed)


def dtype_of(args: argparse.Namespace):
    import torch

    return getattr(torch, args.dtype)
