"""Time to first token of a follow-up question: cold prefill vs the video prefix cache.

    python benchmarks/prefix_cache.py [--frames 31] [--reps 3] [--out benchmarks/results]

Target: a random LLaVA-OneVision with a Qwen2-shaped language model (hidden 768, 12 layers,
12 heads / 2 KV heads, FFN 2048, vocab 32000: ~122M parameters, the verify_cost shape) and a
one-layer SigLIP-shaped tower at the real 384 px / patch 14 (196 visual tokens per frame after
pooling), fp32, on this machine. 31 frames give ~6k visual tokens.

Per question, time to first token (TTFT) = the target prefill + choosing the first token
(`generate(..., max_new_tokens=1)`), measured three ways: cold (the whole prompt, video
included), warm (a second question about the same video, restoring the first prompt's
`snapshot()` and prefilling only the new question), and the video's decode + preprocessing
(paid per request before either). The warm answer is checked to equal the cold one over 32
tokens. Writes prefix_cache.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sparrow.speculative.generate import generate
from sparrow.targets import wrap_model
from sparrow.video.io import read_video, write_video
from sparrow.video.processing import preprocess_video

VOCAB = 32000


def build_target():
    from transformers import AutoModelForImageTextToText, LlavaOnevisionConfig

    text = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=768, intermediate_size=2048,
                num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=2,
                max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, image_size=384, patch_size=14)
    config = LlavaOnevisionConfig(text_config=text, vision_config=vision, vision_feature_layer=-1,
                                  image_token_index=VOCAB - 2, video_token_index=VOCAB - 1,
                                  tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    return wrap_model(model, processor_config={"image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                                               "size": {"height": 384, "width": 384}})


def prompt(video_tokens: int, question_seed: int) -> torch.Tensor:
    """(1, L): a fixed system part, the video placeholders, then a question of 24 tokens."""
    rng = np.random.default_rng(question_seed)
    head = torch.arange(100, 140)
    question = torch.from_numpy(rng.integers(200, 20000, size=24))
    return torch.cat([head, torch.full((video_tokens,), VOCAB - 1), question])[None]


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=31)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    target = build_target()
    with tempfile.TemporaryDirectory() as tmp:
        clip_path = Path(tmp) / "clip.mp4"
        rng = np.random.default_rng(0)
        write_video(clip_path, rng.integers(0, 255, (args.frames, 240, 320, 3), dtype=np.uint8))
        decode_s = []
        for _ in range(args.reps):
            seconds, video = timed(lambda: preprocess_video(
                read_video(clip_path, num_frames=args.frames), target.config,
                target.processor_config))
            decode_s.append(seconds)
    first, second = prompt(video.num_visual_tokens, 1), prompt(video.num_visual_tokens, 2)
    cold_s, warm_s = [], []
    for _ in range(args.reps):
        seconds, _ = timed(lambda: generate(target, first, video, max_new_tokens=1))
        cold_s.append(seconds)
        state = target.snapshot()
        seconds, _ = timed(lambda state=state: generate(target, second, video, max_new_tokens=1,
                                                        prefix=state))
        warm_s.append(seconds)
    cold_answer = generate(target, second, video, max_new_tokens=32).token_ids
    warm_answer = generate(target, second, video, max_new_tokens=32, prefix=state).token_ids

    command = "python benchmarks/prefix_cache.py " + " ".join(argv or sys.argv[1:])
    results = {
        "command": command.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "frames": args.frames,
        "visual_tokens": video.num_visual_tokens,
        "prompt_tokens": int(first.shape[1]),
        "reused_tokens": state.common_length(second[0]),
        "prefix_state_mb": state.nbytes() / 2**20,
        "ttft_cold_s": cold_s,
        "ttft_warm_s": warm_s,
        "video_decode_preprocess_s": decode_s,
        "median_cold_s": statistics.median(cold_s),
        "median_warm_s": statistics.median(warm_s),
        "median_decode_s": statistics.median(decode_s),
        "warm_over_cold": statistics.median(warm_s) / statistics.median(cold_s),
        "warm_answer_equals_cold": warm_answer == cold_answer,
    }
    results["with_decode_warm_over_cold"] = (
        (results["median_warm_s"] + results["median_decode_s"])
        / (results["median_cold_s"] + results["median_decode_s"])
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix_cache.json").write_text(json.dumps(results, indent=2) + "\n")
    table = [
        "# Follow-up question: time to first token, cold vs video prefix cache",
        "",
        f"`{results['command']}`",
        "",
        f"{results['date']}, CPU, {results['threads']} torch threads, torch {results['torch']}; "
        f"random 122M Qwen2-shaped LLaVA-OneVision, {results['frames']} frames -> "
        f"{results['visual_tokens']} visual tokens, prompt {results['prompt_tokens']} tokens, "
        f"{results['reused_tokens']} reused from the cached state "
        f"({results['prefix_state_mb']:.0f} MiB).",
        "",
        f"| step | median s (of {args.reps}) |",
        "|---|---:|",
        f"| TTFT cold (full prefill) | {results['median_cold_s']:.3f} |",
        f"| TTFT warm (prefix cache) | {results['median_warm_s']:.3f} |",
        f"| video decode + preprocess (per request) | {results['median_decode_s']:.3f} |",
        "",
        f"warm / cold: {results['warm_over_cold']:.4f}; counting the video decode both pay: "
        f"{results['with_decode_warm_over_cold']:.4f}. Warm answer equals cold answer over 32 "
        f"tokens: {results['warm_answer_equals_cold']}.",
    ]
    (out / "prefix_cache.md").write_text("\n".join(table) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = ["cold TTFT", "warm TTFT", "video decode"]
        values = [results["median_cold_s"], results["median_warm_s"], results["median_decode_s"]]
        ax.bar(labels, values, color=["#999999", "#2a7ab0", "#d9a03f"])
        ax.set_ylabel("seconds (median)")
        ax.set_title(f"Follow-up TTFT at {results['visual_tokens']} visual tokens (CPU)")
        for i, value in enumerate(values):
            ax.text(i, value, f"{value:.2f}s", ha="center", va="bottom")
        fig.tight_layout()
        fig.savefig(out / "prefix_cache.png", dpi=120)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print("\n".join(table))
    return 0 if results["warm_answer_equals_cold"] else 1


if __name__ == "__main__":
    sys.exit(main())
