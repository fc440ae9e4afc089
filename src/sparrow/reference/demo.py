"""`make demo`: the reference target describes a video, plain vs speculative, output compared.

The reference target is SmolLM2-135M-Instruct in a LLaVA-OneVision body with eyes trained here
on synthetic video (see MODEL_CARD.md); the first run assembles it into the cache. The demo
renders a synthetic video it has never seen (its ground truth is known), asks for a detailed
description with plain decoding and with Sparrow and EAGLE speculative decoding, checks that
all three answers are identical token for token, and scores the answer's facts against the
ground truth. The drafts are randomly initialised (draft training is a later step), so they
are rarely accepted: this shows the pipeline and its losslessness, not a speedup.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

DEMO_SEED = 1_000_007  # an evaluation seed (synthetic.EVAL_SEED_START + 7): never trained on
NUM_FRAMES = 16


def main() -> int:
    import sparrow
    from sparrow.reference import synthetic

    print("sparrow demo: the reference target (SmolLM2-135M-Instruct + eyes trained on synthetic "
          "video), plain vs speculative decoding")
    with tempfile.TemporaryDirectory() as tmp:
        scene = synthetic.generate_scene(DEMO_SEED, NUM_FRAMES)
        clip = synthetic.write_scene(scene, Path(tmp) / "demo.mp4")
        facts = synthetic.scene_facts(scene)
        target = sparrow.load_target("reference")
        question = "Describe the video in detail."
        runs = {}
        for method in ("ar", "sparrow", "eagle"):
            draft = None if method == "ar" else sparrow.init_draft(target, mode=method, seed=0)
            runs[method] = sparrow.answer(target, question, clip, num_frames=NUM_FRAMES, method=method,
                                          draft=draft, max_new_tokens=200)
    base = runs["ar"].result.token_ids
    print(f"video: a synthetic clip (seed {DEMO_SEED}), {NUM_FRAMES} frames -> "
          f"{runs['ar'].result.num_visual_tokens} visual tokens")
    print(f"\nquestion: {question}\nanswer:   {runs['ar'].text}\n")
    print(f"ground truth: {synthetic.describe(facts, 0)}")
    score = synthetic.score_description(runs["ar"].text, facts)
    print(f"key facts stated correctly: {score['correct']}/{score['total']} "
          f"(score {score['score']:.2f}, {score['hallucinated']} invented)\n")
    for method, run in runs.items():
        r = run.result
        same = "identical to ar" if r.token_ids == base else "DIFFERS FROM AR"
        print(f"{method:8s} tau {r.tau:4.2f}  target calls {r.target_calls:3d}  "
              f"decode {r.timings.decode_s:6.2f} s  {same}")
    print("(random drafts: low acceptance is expected until drafts are trained; see benchmarks/)")
    lossless = all(run.result.token_ids == base for run in runs.values())
    print("lossless: yes" if lossless else "lossless: NO")
    return 0 if lossless else 1


if __name__ == "__main__":
    sys.exit(main())
