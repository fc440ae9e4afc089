"""`sparrow` command line: a thin layer over sparrow.api.

Errors a user can cause (missing or corrupt video, bad tree string, draft/target mismatch)
print one line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sparrow.errors import SparrowError

EXIT_USER_ERROR = 2


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", required=True,
        help="checkpoint directory of a supported video LLM, 'reference' (the built-in reference "
        "video LLM: SmolLM2-135M with eyes trained on synthetic video), reference:WEIGHTS (that "
        "model with other trained eyes, e.g. a training checkpoint), or tiny:<family> "
        "(a tiny random model: tiny:qwen2_vl, tiny:qwen2_5_vl, tiny:qwen3_vl, "
        "tiny:llava_onevision, tiny:llava_next_video)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default float32: half precision is slow on CPUs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparrow",
        description="Lossless speculative decoding for video LLMs (the Sparrow method).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer a question about a video")
    _add_target(gen)
    gen.add_argument("--draft", help="draft checkpoint directory (needed by sparrow/eagle)")
    gen.add_argument("--method", default=None, choices=["ar", "sparrow", "eagle"],
                     help="decoding method (default: sparrow with --draft, else ar)")
    gen.add_argument("--video", help="video file (any container/codec PyAV reads)")
    gen.add_argument("--prompt", required=True, help="the question or instruction")
    gen.add_argument("--num-frames", type=int, default=None,
                     help="frames sampled uniformly over the video (default 8)")
    gen.add_argument("--fps", type=float, default=None,
                     help="sample this many frames per second instead of --num-frames")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None, help="sampling seed")
    gen.add_argument("--tree", default="30-4-8", help="draft tree total_tokens-depth-top_k")
    gen.add_argument("--json", action="store_true", help="print one JSON object")

    init = sub.add_parser("draft-init", help="write a randomly initialised draft for a target")
    _add_target(init)
    init.add_argument("--out", required=True, help="output directory")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--mode", default="sparrow", choices=["sparrow", "eagle"])

    serve = sub.add_parser("serve", help="serve the OpenAI chat completions API (video chat)")
    _add_target(serve)
    _add_decoding(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model-name", help="model id clients send (default: the --target value)")
    serve.add_argument("--media-root", action="append", default=[], metavar="DIR",
                       help="allow local video paths under DIR (repeatable; default: uploads only)")
    serve.add_argument("--api-key", default=os.environ.get("SPARROW_API_KEY"),
                       help="require Authorization: Bearer KEY (default: $SPARROW_API_KEY)")
    serve.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    serve.add_argument("--prefix-cache-mb", type=float, default=4096,
                       help="memory for prefilled video prompts reused by follow-up questions "
                       "(least recently used dropped first; 0 = off; default 4096)")
    serve.add_argument("--num-frames", type=int, default=8,
                       help="frames sampled when a request does not say (default 8)")
    serve.add_argument("--max-frames", type=int, default=64)
    serve.add_argument("--max-visual-tokens", type=int, default=16384)
    serve.add_argument("--max-tokens", type=int, default=1024,
                       help="the most tokens a request may ask for (and the default)")
    serve.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    serve.add_argument("--max-upload-mb", type=float, default=64.0, help="request body limit")

    _add_eval_target(sub)

    chat = sub.add_parser("chat", help="chat about a video in the terminal (questions on stdin)")
    _add_target(chat)
    _add_decoding(chat)
    chat.add_argument("--video", help="video file")
    chat.add_argument("--num-frames", type=int, default=None, help="frames (default 8)")
    chat.add_argument("--fps", type=float, default=None)
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--seed", type=int, default=None)
    return parser


def _add_eval_target(sub) -> None:
    from sparrow.eval_target import DEFAULT_LENGTHS, LONG

    ev = sub.add_parser("eval-target", help="key-fact accuracy of a target's video descriptions "
                        "at several visual-token lengths (synthetic videos, unseen seeds)")
    _add_target(ev)
    ev.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                    help="visual-token lengths, comma-separated (default %(default)s)")
    ev.add_argument("--videos", type=int, default=20, help=f"videos per length up to {LONG} tokens")
    ev.add_argument("--long-videos", type=int, default=3, help=f"videos per length above {LONG} tokens")
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--out", default="eval-target",
                    help="results path without suffix: writes .json, .md, .png and .jsonl (resume log)")
    ev.add_argument("--baseline", metavar="RECORDS",
                    help="another checkpoint's eval-target records (.jsonl or .json): the report adds "
                    "the score difference paired by video, with its standard error")


def _add_decoding(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft", help="draft checkpoint directory (needed by sparrow/eagle)")
    parser.add_argument("--method", default=None, choices=["ar", "sparrow", "eagle"],
                        help="decoding method (default: sparrow with --draft, else ar)")
    parser.add_argument("--tree", default="30-4-8", help="draft tree total_tokens-depth-top_k")


def _load_models(args: argparse.Namespace):
    """(target, draft or None, method, tree) for serve and chat."""
    from sparrow.decoding.tree import TreeSpec
    from sparrow.draft import load_draft
    from sparrow.errors import ConfigError
    from sparrow.targets import load_target

    method = args.method or ("sparrow" if args.draft else "ar")
    tree = TreeSpec.parse(args.tree)
    if method != "ar" and not args.draft:
        raise ConfigError(f"--method {method} needs --draft DIR (create one with draft-init)")
    target = load_target(args.target, dtype=_dtype(args.dtype), device=args.device)
    draft = load_draft(args.draft, target, mode=method) if method != "ar" else None
    return target, draft, method, tree


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def cmd_generate(args: argparse.Namespace) -> int:
    from sparrow.api import answer
    from sparrow.decoding.tree import TreeSpec
    from sparrow.draft import load_draft
    from sparrow.errors import ConfigError
    from sparrow.targets import load_target

    method = args.method or ("sparrow" if args.draft else "ar")
    tree = TreeSpec.parse(args.tree)  # fail fast, before loading anything
    if method != "ar" and not args.draft:
        raise ConfigError(f"--method {method} needs --draft DIR (create one with draft-init)")
    if args.num_frames is not None and args.fps is not None:
        raise ConfigError("give --num-frames or --fps, not both")
    if args.video is not None and not os.path.isfile(args.video):
        raise SparrowError(f"--video {args.video}: file not found; check the path")
    target = load_target(args.target, dtype=_dtype(args.dtype), device=args.device)
    draft = load_draft(args.draft, target, mode=method) if method != "ar" else None
    result = answer(
        target, args.prompt, args.video, num_frames=args.num_frames, fps=args.fps,
        method=method, draft=draft, tree=tree, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
    )
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        r = result.result
        print(result.text)
        print(
            f"[{method}] {len(r.token_ids)} tokens, tau {r.tau:.2f}, "
            f"{r.target_calls} target calls, "
            f"{r.num_visual_tokens} visual tokens, prefill {r.timings.prefill_s:.2f}s, "
            f"decode {r.timings.decode_s:.2f}s",
            file=sys.stderr,
        )
    return 0


def cmd_draft_init(args: argparse.Namespace) -> int:
    from sparrow.draft import init_draft
    from sparrow.targets import load_target

    target = load_target(args.target, dtype=_dtype(args.dtype), device=args.device)
    draft = init_draft(target, mode=args.mode, seed=args.seed)
    out = draft.save(args.out)
    params = sum(p.numel() for p in draft.parameters())
    print(f"wrote a random {args.mode} draft ({params:,} parameters) for {target.name} to {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sparrow.errors import ConfigError
    from sparrow.serve.app import ServeSettings, create_app
    from sparrow.serve.engine import Engine
    from sparrow.serve.prefix_cache import PrefixCache
    from sparrow.serve.server import serve

    for root in args.media_root:
        if not os.path.isdir(root):
            raise ConfigError(f"--media-root {root}: not a directory")
    for name in ("max_queue", "num_frames", "max_frames", "max_visual_tokens", "max_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.timeout <= 0 or args.max_upload_mb <= 0:
        raise ConfigError("--timeout and --max-upload-mb must be positive")
    target, draft, method, tree = _load_models(args)
    settings = ServeSettings(
        model_id=args.model_name or args.target,
        media_roots=[Path(root).resolve() for root in args.media_root],
        api_key=args.api_key or None, num_frames=args.num_frames, max_frames=args.max_frames,
        max_visual_tokens=args.max_visual_tokens, max_tokens=args.max_tokens,
        timeout_s=args.timeout, max_upload_bytes=int(args.max_upload_mb * 2**20),
    )
    if args.prefix_cache_mb < 0:
        raise ConfigError(f"--prefix-cache-mb {args.prefix_cache_mb}: must be >= 0 (0 = off)")
    prefix_cache = PrefixCache(int(args.prefix_cache_mb * 2**20)) if args.prefix_cache_mb else None
    engine = Engine(target, draft, method=method, tree=tree, max_queue=args.max_queue,
                    prefix_cache=prefix_cache)
    print(f"sparrow serve: {settings.model_id} ({method}) on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    serve(create_app(engine, settings), args.host, args.port)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from sparrow.api import prepare_video
    from sparrow.decoding.sampling import SamplingParams
    from sparrow.errors import ConfigError
    from sparrow.serve.chat import chat

    if args.num_frames is not None and args.fps is not None:
        raise ConfigError("give --num-frames or --fps, not both")
    if args.video is not None and not os.path.isfile(args.video):
        raise SparrowError(f"--video {args.video}: file not found; check the path")
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    target, draft, method, tree = _load_models(args)
    video = None
    if args.video is not None:
        video = prepare_video(target, args.video, num_frames=args.num_frames, fps=args.fps)
    chat(target, video, method=method, draft=draft, tree=tree,
         max_new_tokens=args.max_new_tokens, sampling=sampling)
    return 0


def cmd_eval_target(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sparrow.errors import ConfigError
    from sparrow.eval_target import evaluate
    from sparrow.targets import load_target

    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--lengths {args.lengths!r}: give integers separated by commas") from None
    if not lengths or min(lengths) <= 0 or args.videos < 1 or args.long_videos < 1:
        raise ConfigError("--lengths must be positive and --videos / --long-videos at least 1")
    target = load_target(args.target, dtype=_dtype(args.dtype), device=args.device)
    command = "sparrow " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name in ("sparrow", "cli.py") else ""
    rows = evaluate(target, lengths, Path(args.out), videos=args.videos, long_videos=args.long_videos,
                    max_new_tokens=args.max_new_tokens, command=command,
                    baseline=Path(args.baseline) if args.baseline else None)
    for row in rows:
        print(f"{row['num_visual_tokens']:>7,} visual tokens ({row['num_frames']} frames, {row['videos']} "
              f"videos): key-fact accuracy {row['score']:.3f}")
    print(f"wrote {args.out}.json / .md / .png")
    return 0


COMMANDS = {"generate": cmd_generate, "draft-init": cmd_draft_init, "serve": cmd_serve,
            "chat": cmd_chat, "eval-target": cmd_eval_target}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SparrowError as error:
        print(f"sparrow {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"sparrow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
