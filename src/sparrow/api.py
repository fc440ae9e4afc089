"""The small Python API the command line and the server are built on.

    import sparrow
    target = sparrow.load_target("tiny:qwen2_vl")            # or a checkpoint directory
    draft = sparrow.init_draft(target, mode="sparrow")        # or sparrow.load_draft(DIR, target)
    answer = sparrow.answer(target, "What happens?", video="clip.mp4", draft=draft,
                            method="sparrow", tree="30-4-8", max_new_tokens=64)
    print(answer.text, answer.result.tau)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sparrow.draft import DraftModel
from sparrow.options import DEFAULT_MAX_NEW_TOKENS, DEFAULT_NUM_FRAMES
from sparrow.speculative.generate import GenerationResult, generate
from sparrow.speculative.sampling import SamplingParams
from sparrow.speculative.tree import DEFAULT_TREE, TreeSpec, parse_tree
from sparrow.targets import TargetAdapter
from sparrow.targets.base import PrefixState
from sparrow.video.io import read_video
from sparrow.video.processing import VideoInputs, decode_resizer, preprocess_video
from sparrow.video.prompt import build_video_prompt


@dataclass
class Answer:
    text: str
    result: GenerationResult

    def to_dict(self) -> dict:
        return {"text": self.text, **self.result.to_dict()}


def prepare_video(
    target: TargetAdapter,
    path: str | Path,
    num_frames: int | None = None,
    fps: float | None = None,
) -> VideoInputs:
    """Decode, sample and preprocess a video file for `target`."""
    if num_frames is None and fps is None:
        num_frames = DEFAULT_NUM_FRAMES
    clip = read_video(path, num_frames=num_frames, fps=fps,
                      transform=decode_resizer(target.config, target.processor_config))
    return preprocess_video(clip, target.config, target.processor_config, dtype=target.dtype)


def answer(
    target: TargetAdapter,
    question: str,
    video: str | Path | VideoInputs | None = None,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    method: str = "ar",
    draft: DraftModel | None = None,
    tree: TreeSpec | str = DEFAULT_TREE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    system: str | None = None,
    prefix: PrefixState | None = None,
) -> Answer:
    """Answer `question` about `video` (a file path, prepared VideoInputs, or None).

    `prefix` (from `target.snapshot()` after an earlier answer or `target.prefill`) skips
    prefilling the part of the prompt it covers: ask several questions, or compare several
    methods, over one prefill of the video."""
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    tree = parse_tree(tree) if isinstance(tree, str) else tree
    if video is not None and not isinstance(video, VideoInputs):
        video = prepare_video(target, video, num_frames=num_frames, fps=fps)
    input_ids = build_video_prompt(target.tokenizer, target.config, video, question, system=system)
    result = generate(
        target,
        input_ids,
        video,
        method=method,
        draft=draft,
        tree=tree,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        prefix=prefix,
    )
    text = target.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    return Answer(text=text, result=result)
