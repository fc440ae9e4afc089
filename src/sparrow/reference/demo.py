"""`make demo`: the reference target describes an unseen video, plain vs trained drafts.

The reference target is SmolLM2-135M-Instruct in a LLaVA-OneVision body with eyes trained here
on synthetic video (see MODEL_CARD.md); the first run assembles it into the cache. The demo
renders a synthetic video it has never seen (an evaluation seed, ~1.5k visual tokens) and asks
for a detailed description three times from one prefill of the video: plain decoding, the
shipped Sparrow draft and the shipped EAGLE-full draft (`sparrow.reference.drafts`). It prints
the answer, each method's decode time, tau and decode speedup (DSR), checks that the three
answers are identical token for token, and scores the answer against the ground truth.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

DEMO_SEED = 1_000_007  # an evaluation seed (synthetic.EVAL_SEED_START + 7): never trained on
NUM_FRAMES = 95  # 1,521 visual tokens
QUESTION = "Describe the video in detail."
MAX_NEW_TOKENS = 200


def main() -> int:
    import sparrow
    from sparrow.reference import drafts, synthetic
    from sparrow.reference.eval_target import eval_scene
    from sparrow.video.prompt import build_video_prompt

    print("sparrow demo: the reference target (SmolLM2-135M-Instruct + eyes trained on synthetic "
          "video), plain decoding vs trained drafts")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        scene = eval_scene(DEMO_SEED, NUM_FRAMES)
        clip = synthetic.write_scene(scene, Path(tmp) / "demo.mp4")
        facts = synthetic.scene_facts(scene)
        print("[1/5] loading the reference target (assembled on first use)", flush=True)
        target = sparrow.load_target("reference")
        video = sparrow.prepare_video(target, clip, num_frames=NUM_FRAMES)
        ids = build_video_prompt(target.tokenizer, target.config, video, QUESTION)
        print(f"[2/5] prefilling the video once ({video.num_visual_tokens} visual tokens)", flush=True)
        t = time.perf_counter()
        target.prefill(ids, video)
        prefill_s = time.perf_counter() - t
        prefix = target.snapshot()
        runs = {}
        for step, method in enumerate(("ar", "sparrow", "eagle"), start=3):
            draft = None if method == "ar" else sparrow.load_draft(drafts.path(method), target)
            print(f"[{step}/5] decoding with {method}", flush=True)
            runs[method] = sparrow.answer(target, QUESTION, video, method=method, draft=draft,
                                          tree=drafts.DEMO_TREE, max_new_tokens=MAX_NEW_TOKENS,
                                          prefix=prefix)
    base = runs["ar"].result
    print(f"\nvideo: an unseen synthetic clip (seed {DEMO_SEED}), {NUM_FRAMES} frames -> "
          f"{base.num_visual_tokens} visual tokens, prefilled once in {prefill_s:.1f} s")
    print(f"\nquestion: {QUESTION}\nanswer:   {runs['ar'].text}\n")
    print(f"ground truth: {synthetic.describe(facts, 0)}")
    score = synthetic.score_description(runs["ar"].text, facts)
    print(f"key facts stated correctly: {score['correct']}/{score['total']} "
          f"(score {score['score']:.2f}, {score['hallucinated']} invented)\n")
    per_token = base.timings.decode_s / len(base.token_ids)
    for method, run in runs.items():
        r = run.result
        same = "identical to ar" if r.token_ids == base.token_ids else "DIFFERS FROM AR"
        dsr = per_token / (r.timings.decode_s / len(r.token_ids))
        print(f"{method:8s} decode {r.timings.decode_s:6.2f} s  tau {r.tau:4.2f}  DSR {dsr:4.2f}x  "
              f"target calls {r.target_calls:3d}  {same}")
    print(f"(tree {drafts.DEMO_TREE}; DSR: decode-phase speedup over ar, prefill excluded; "
          f"{time.perf_counter() - started:.0f} s in all)")
    lossless = all(run.result.token_ids == base.token_ids for run in runs.values())
    print("lossless: yes" if lossless else "lossless: NO")
    return 0 if lossless else 1


if __name__ == "__main__":
    sys.exit(main())
