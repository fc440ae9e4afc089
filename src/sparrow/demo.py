"""`make demo`: the engine end to end on a video, plain vs speculative, output compared.

Until the reference target (a real language model with trained eyes) lands, the demo runs on
a tiny random Qwen2-VL built from config: its words are noise, but every step is the real
one: a video file is written and decoded, preprocessed for the model, prefilled, and answered
by plain decoding and by Sparrow speculative decoding, whose output must be identical.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np


def _write_demo_clip(path: Path) -> None:
    from sparrow.video.io import write_video

    frames = np.zeros((24, 96, 128, 3), dtype=np.uint8)
    frames[..., 2] = 40  # dark blue background
    for t in range(frames.shape[0]):
        x = 8 + 4 * t  # a red square moving right
        frames[t, 36:60, x : x + 24] = (220, 30, 30)
    write_video(path, frames, fps=8)


def main() -> int:
    import sparrow

    print("sparrow demo: the reference target is not built yet, so this runs on a TINY RANDOM "
          "Qwen2-VL (random words, real pipeline).")
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "demo.mp4"
        _write_demo_clip(clip)
        target = sparrow.load_target("tiny:qwen2_vl")
        draft = sparrow.init_draft(target, mode="sparrow", seed=0)
        question = "Describe the video in detail."
        runs = {}
        for method in ("ar", "sparrow", "eagle"):
            runs[method] = sparrow.answer(
                target, question, clip, num_frames=8, method=method,
                draft=None if method == "ar" else draft, max_new_tokens=64,
            )
        base = runs["ar"].result.token_ids
        visual = runs["ar"].result.num_visual_tokens
        print(f"video: {clip.name}, 8 frames -> {visual} visual tokens")
        for method, run in runs.items():
            r = run.result
            same = "identical to ar" if r.token_ids == base else "DIFFERS FROM AR"
            print(f"{method:8s} tau {r.tau:4.2f}  target calls {r.target_calls:3d}  "
                  f"decode {r.timings.decode_s * 1000:7.1f} ms  {same}")
        print(f"answer: {runs['ar'].text!r}")
        print("(a tiny target costs about as much as its draft, so drafting cannot pay off here; "
              "speedups need a real target: see benchmarks/)")
        lossless = all(run.result.token_ids == base for run in runs.values())
    print("lossless: yes" if lossless else "lossless: NO")
    return 0 if lossless else 1


if __name__ == "__main__":
    sys.exit(main())
