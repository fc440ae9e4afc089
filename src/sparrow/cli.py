"""`sparrow` command line: a thin layer over sparrow.api.

Errors a user can cause (missing or corrupt video, bad tree string, draft/target mismatch)
print one line on stderr and exit with status 2; no traceback. The flags several commands
share, and their defaults, come from `sparrow.options`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sparrow import options
from sparrow.errors import SparrowError

EXIT_USER_ERROR = 2


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The parser, and the handler of each subcommand by name."""
    from sparrow import fixture
    from sparrow.training import cli as training_cli

    parser = argparse.ArgumentParser(
        prog="sparrow",
        description="Lossless speculative decoding for video LLMs (the Sparrow method).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer a question about a video")
    options.add_target(gen)
    options.add_decoding(gen)
    options.add_video(gen)
    gen.add_argument("--prompt", required=True, help="the question or instruction")
    options.add_sampling(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object")

    init = sub.add_parser("draft-init", help="write a randomly initialised draft for a target")
    options.add_target(init)
    init.add_argument("--out", required=True, help="output directory")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--mode", default="sparrow", choices=options.METHODS[1:])

    serve = sub.add_parser("serve", help="serve the OpenAI chat completions API (video chat)")
    options.add_target(serve)
    options.add_decoding(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model-name", help="model id clients send (default: the --target value's "
                       "name, without its directory)")
    serve.add_argument("--media-root", action="append", default=[], metavar="DIR",
                       help="allow local video paths under DIR (repeatable; default: uploads only)")
    serve.add_argument("--api-key", default=os.environ.get("SPARROW_API_KEY"),
                       help="require Authorization: Bearer KEY (default: $SPARROW_API_KEY)")
    serve.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    serve.add_argument("--prefix-cache-mb", type=float, default=4096,
                       help="memory for prefilled video prompts reused by follow-up questions "
                       "(least recently used dropped first; 0 = off; default 4096)")
    serve.add_argument("--num-frames", type=int, default=options.DEFAULT_NUM_FRAMES,
                       help="frames sampled when a request does not say "
                       f"(default {options.DEFAULT_NUM_FRAMES})")
    serve.add_argument("--max-frames", type=int, default=64)
    serve.add_argument("--max-visual-tokens", type=int, default=16384)
    serve.add_argument("--max-tokens", type=int, default=1024,
                       help="the most tokens a request may ask for (and the default)")
    serve.add_argument("--timeout", type=float, default=300.0,
                       help="seconds per request, from its first byte to its last token (default 300)")
    serve.add_argument("--max-preprocess", type=int, default=2,
                       help="requests decoding their video at once; the rest wait (default 2)")
    serve.add_argument("--allowed-origins", default="",
                       help="comma-separated browser origins allowed by CORS (default: none)")
    serve.add_argument("--max-video-pixels", type=int, default=4096 * 2160,
                       help="largest frame (width x height) accepted, read from the container before "
                            "decoding (default 4096x2160 = 8847360)")
    serve.add_argument("--max-upload-mb", type=float, default=64.0, help="request body limit")

    chat = sub.add_parser("chat", help="chat about a video in the terminal (questions on stdin)")
    options.add_target(chat)
    options.add_decoding(chat)
    options.add_video(chat)
    options.add_sampling(chat)

    bench = sub.add_parser(
        "bench", help="plain decoding vs drafts on held-out videos: tau, DSR, timings",
        description="AR and every draft on the same videos and prompts, each video prefilled "
        "once; writes cells.jsonl (resumable), bench.json, bench.md and bench.png to --out.")
    options.add_target(bench)
    bench.add_argument("--preset", choices=sorted(BENCH_PRESETS), help="settings of a named "
                       "experiment; flags given as well override them. paper: "
                       + "; ".join(f"--{k.replace('_', '-')} {v}" for k, v in BENCH_PRESETS["paper"].items()))
    bench.add_argument("--drafts", help="comma-separated draft directories (their directory names "
                       "label them), or reference:sparrow / reference:eagle")
    bench.add_argument("--lengths", help="visual-token lengths (default 0.5k,1.5k)")
    bench.add_argument("--videos", type=int,
                       help="videos per length (reference target: evaluation seeds; default 4)")
    bench.add_argument("--prompts", help="JSON Lines of questions and videos (targets other than "
                       "the reference)")
    bench.add_argument("--temperatures", help="comma-separated (default 0)")
    bench.add_argument("--tree", help=options.TREE_HELP + "; several, comma-separated "
                       "(auto,30-4-8), run every draft with each, as method draft@tree")
    bench.add_argument("--max-new-tokens", type=int, help="answer length limit (default 128)")
    bench.add_argument("--out", required=True, help="results directory (resumed if it holds cells)")

    analyze = sub.add_parser(
        "analyze", help="the phenomena behind the method: removing the video from layer x on, "
        "hidden-state drift, an EAGLE-full draft's attention on visual tokens",
        description="Measures on held-out videos (see sparrow.analyze): the target's answers when "
        "its text positions stop seeing the video from decoder layer x on; per layer, the cosine "
        "of visual and text states to their input embeddings; with --draft, an EAGLE-full draft's "
        "attention mass on visual positions per length. Writes records.jsonl (resumable), "
        "analyze.json, analyze.md and analyze.png to --out.")
    options.add_target(analyze)
    analyze.add_argument("--draft", help="an EAGLE-full draft (eagle mode) for the dilution "
                         "measurement (reference target default: reference:eagle; 'none' skips it)")
    analyze.add_argument("--removal-length", default="1.5k",
                         help="visual tokens of the removal and drift videos (default %(default)s)")
    analyze.add_argument("--lengths", default="0.5k,1.5k,6k",
                         help="visual-token lengths of the dilution measurement (default %(default)s)")
    analyze.add_argument("--videos", type=int, default=4, help="videos per length (default 4)")
    analyze.add_argument("--layers", help="cut layers x, comma-separated (default every second "
                         "layer and the last, which removes nothing)")
    analyze.add_argument("--prompts", help="JSON Lines of questions and videos (targets other than "
                         "the reference)")
    analyze.add_argument("--tree", default="30-4-8", help="the dilution draft's tree (default 30-4-8)")
    analyze.add_argument("--max-new-tokens", type=int, default=96,
                         help="answer length (default 96)")
    analyze.add_argument("--out", required=True, help="results directory (resumed if it holds records)")

    commands = {"generate": cmd_generate, "draft-init": cmd_draft_init, "serve": cmd_serve,
                "chat": cmd_chat, "bench": cmd_bench, "analyze": cmd_analyze}
    commands.update(training_cli.add_commands(sub))
    commands.update(fixture.add_commands(sub))
    return parser, commands


def _load_models(args: argparse.Namespace):
    """(target, draft or None, method, tree), the flags checked before anything is loaded."""
    from sparrow import fixture
    from sparrow.draft import load_draft
    from sparrow.speculative.tree import parse_tree
    from sparrow.targets import load_target

    method = options.method_of(args)  # None: the draft's own mode
    tree = parse_tree(args.tree)
    target = load_target(args.target, dtype=options.dtype_of(args), device=args.device)
    draft = None
    if method != "ar":
        draft = load_draft(fixture.resolve_draft(args.draft), target, mode=method)
    return target, draft, method or draft.mode, tree


def cmd_generate(args: argparse.Namespace) -> int:
    from sparrow.api import answer

    options.check_video(args)
    sampling = options.sampling_of(args)
    target, draft, method, tree = _load_models(args)
    result = answer(
        target, args.prompt, args.video, num_frames=args.num_frames, fps=args.fps,
        method=method, draft=draft, tree=tree, max_new_tokens=args.max_new_tokens,
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        seed=sampling.seed,
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

    target = load_target(args.target, dtype=options.dtype_of(args), device=args.device)
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
    for name in ("max_queue", "num_frames", "max_frames", "max_visual_tokens", "max_tokens",
                 "max_preprocess", "max_video_pixels"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.timeout <= 0 or args.max_upload_mb <= 0:
        raise ConfigError("--timeout and --max-upload-mb must be positive")
    if args.prefix_cache_mb < 0:
        raise ConfigError(f"--prefix-cache-mb {args.prefix_cache_mb}: must be >= 0 (0 = off)")
    target, draft, method, tree = _load_models(args)
    settings = ServeSettings(
        model_id=args.model_name or public_model_id(args.target),
        media_roots=[Path(root).resolve() for root in args.media_root],
        api_key=args.api_key or None, num_frames=args.num_frames, max_frames=args.max_frames,
        max_visual_tokens=args.max_visual_tokens, max_tokens=args.max_tokens,
        timeout_s=args.timeout, max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_preprocess=args.max_preprocess, max_video_pixels=args.max_video_pixels,
        allowed_origins=[o.strip() for o in args.allowed_origins.split(",") if o.strip()],
    )
    prefix_cache = PrefixCache(int(args.prefix_cache_mb * 2**20)) if args.prefix_cache_mb else None
    engine = Engine(target, draft, method=method, tree=tree, max_queue=args.max_queue,
                    prefix_cache=prefix_cache)
    print(f"sparrow serve: {settings.model_id} ({method}) on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    serve(create_app(engine, settings), args.host, args.port)
    return 0


def public_model_id(target: str) -> str:
    """The model id a server shows for `--target`: its name, never a filesystem path
    ('reference:/runs/x/weights.safetensors' -> 'reference:weights.safetensors')."""
    kind, sep, rest = target.partition(":")
    if sep and "/" not in kind and "\\" not in kind:
        return f"{kind}:{public_model_id(rest)}" if rest else target
    return os.path.basename(os.path.normpath(target)) if ("/" in target or "\\" in target) else target


def cmd_chat(args: argparse.Namespace) -> int:
    from sparrow.api import prepare_video
    from sparrow.serve.chat import chat

    options.check_video(args)
    sampling = options.sampling_of(args)
    target, draft, method, tree = _load_models(args)
    video = None
    if args.video is not None:
        video = prepare_video(target, args.video, num_frames=args.num_frames, fps=args.fps)
    chat(target, video, method=method, draft=draft, tree=tree,
         max_new_tokens=args.max_new_tokens, sampling=sampling)
    return 0


BENCH_DEFAULTS = {"drafts": "", "lengths": "0.5k,1.5k", "videos": 4, "temperatures": "0",
                  "tree": "auto", "max_new_tokens": 128}
# Named experiments (README, benchmarks/README.md). paper: METHOD.md's tables on the reference
# target; the drafts of every other row (MSD-like, HiViS-like, the ablations) are added with
# --drafts, as trained by `sparrow train --preset ...`.
BENCH_PRESETS = {"paper": {"drafts": "reference:sparrow,reference:eagle",
                           "lengths": "0.5k,1.5k,6k,17k,25k", "videos": 4, "temperatures": "0,1",
                           "tree": "auto,30-4-8", "max_new_tokens": 128}}


def bench_settings(args: argparse.Namespace) -> argparse.Namespace:
    """The flags given, else the preset's, else the defaults; --drafts adds to a preset's."""
    preset = BENCH_PRESETS.get(args.preset or "", {})
    settings = {}
    for name, default in BENCH_DEFAULTS.items():
        given = getattr(args, name)
        settings[name] = given if given is not None else preset.get(name, default)
    if preset and args.drafts:
        settings["drafts"] = ",".join(d for d in (preset["drafts"], args.drafts) if d)
    return argparse.Namespace(**{**vars(args), **settings})


def cmd_bench(args: argparse.Namespace) -> int:
    from sparrow import fixture
    from sparrow.bench import cases_from_prompts, parse_lengths, parse_trees, run_bench
    from sparrow.errors import ConfigError
    from sparrow.targets import load_target
    from sparrow.training.prompts import read_prompts

    args = bench_settings(args)
    lengths = parse_lengths(args.lengths)
    try:
        temperatures = [float(t) for t in args.temperatures.split(",")]
    except ValueError as error:
        raise ConfigError(f"--temperatures {args.temperatures}: comma-separated numbers") from error
    if any(t < 0 for t in temperatures) or args.videos < 1 or args.max_new_tokens < 1:
        raise ConfigError("--temperatures must be >= 0, --videos and --max-new-tokens >= 1")
    parse_trees(args.tree)
    drafts = [fixture.resolve_draft(d) for d in args.drafts.split(",") if d]
    target = load_target(args.target, dtype=options.dtype_of(args), device=args.device)
    if args.prompts:
        cases = cases_from_prompts(target, read_prompts(args.prompts)[: args.videos], lengths)
    elif fixture.is_reference(args.target):
        cases = fixture.reference_cases(target, lengths, args.videos)
    else:
        raise ConfigError(f"--target {args.target}: give --prompts FILE (JSON Lines of questions "
                          "and videos); only the reference target has built-in evaluation videos")
    report = run_bench(target, cases, drafts, args.out, tree=args.tree, temperatures=temperatures,
                       max_new_tokens=args.max_new_tokens, command="sparrow " + " ".join(sys.argv[1:]))
    from sparrow.bench import markdown

    print(markdown(report["rows"], report))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from sparrow import fixture
    from sparrow.analyze import default_layers, markdown, parse_layers, run_analysis
    from sparrow.bench import cases_from_prompts, parse_lengths
    from sparrow.draft import load_draft
    from sparrow.errors import ConfigError
    from sparrow.speculative.tree import parse_tree
    from sparrow.targets import load_target
    from sparrow.training.prompts import read_prompts

    removal_length = parse_lengths(args.removal_length)
    lengths = parse_lengths(args.lengths)
    if len(removal_length) != 1:
        raise ConfigError(f"--removal-length {args.removal_length}: give one length, e.g. 1.5k")
    if args.videos < 1 or args.max_new_tokens < 1:
        raise ConfigError("--videos and --max-new-tokens must be >= 1")
    tree = parse_tree(args.tree)
    reference = fixture.is_reference(args.target)
    draft_spec = args.draft or ("reference:eagle" if reference else "none")
    target = load_target(args.target, dtype=options.dtype_of(args), device=args.device)
    layers = (parse_layers(args.layers, target.num_layers) if args.layers
              else default_layers(target.num_layers))
    draft = None
    if draft_spec != "none":
        draft = load_draft(fixture.resolve_draft(draft_spec), target)
        if draft.mode != "eagle":
            raise ConfigError(f"--draft {draft_spec}: decodes in {draft.mode} mode and never "
                              "attends to visual positions; give an EAGLE-full draft (eagle mode, "
                              "e.g. reference:eagle), or --draft none")
    score = None
    if args.prompts:
        prompts = read_prompts(args.prompts)[: args.videos]
        removal, dilution = (cases_from_prompts(target, prompts, removal_length),
                             cases_from_prompts(target, prompts, lengths))
    elif reference:
        removal = fixture.reference_cases(target, removal_length, args.videos)
        dilution = fixture.reference_cases(target, lengths, args.videos)
        score = fixture.reference_score
    else:
        raise ConfigError(f"--target {args.target}: give --prompts FILE (JSON Lines of questions "
                          "and videos); only the reference target has built-in evaluation videos")
    if any(case.video is None for case in removal):
        raise ConfigError(f"--prompts {args.prompts}: every prompt needs a video to analyze")
    report = run_analysis(target, removal, dilution, args.out, draft=draft,
                          draft_name=draft_spec if draft else None, layers=layers, tree=tree,
                          max_new_tokens=args.max_new_tokens, score=score,
                          command="sparrow " + " ".join(sys.argv[1:]),
                          settings={"layers": layers, "max_new_tokens": args.max_new_tokens,
                                    "tree": args.tree, "videos": args.videos})
    print(markdown(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    try:
        return commands[args.command](args)
    except SparrowError as error:
        print(f"sparrow {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"sparrow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
