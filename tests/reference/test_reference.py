"""The reference target's body: SmolLM2 inside LLaVA-OneVision (tower random until trained)."""

from __future__ import annotations

import pytest
import torch

from sparrow.api import prepare_video
from sparrow.draft import init_draft
from sparrow.reference import smollm2
from sparrow.reference.assembly import VIDEO_TOKEN, build_reference
from sparrow.speculative.generate import generate
from sparrow.targets import wrap_model
from sparrow.video.prompt import build_video_prompt
from tests.helpers import assert_text_answers_match

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              image_size=64, patch_size=8)
PROCESSOR = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 64, "width": 64}}


@pytest.fixture(scope="module")
def reference():
    model, tokenizer = build_reference(VISION)
    return wrap_model(model, tokenizer, PROCESSOR, name="reference-shell")


def test_text_only_answers_are_smollm2s_own(reference):
    from transformers import AutoModelForCausalLM

    language = AutoModelForCausalLM.from_pretrained(smollm2.checkpoint(), dtype=torch.float32)
    assert_text_answers_match(reference, language)


def test_speculative_decoding_on_the_reference_body_is_lossless(reference, video_file):
    video = prepare_video(reference, video_file(4), num_frames=4)
    assert video.num_visual_tokens == 4 * 16 + 1  # 8x8 patches pooled to 4x4, + one newline
    ids = build_video_prompt(reference.tokenizer, reference.config, video, "Describe the video.")
    assert reference.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN) == reference.video_token_id()
    plain = generate(reference, ids, video, max_new_tokens=16)
    for mode in ("sparrow", "eagle"):
        fast = generate(reference, ids, video, method=mode, draft=init_draft(reference, mode),
                        max_new_tokens=16)
        assert fast.token_ids == plain.token_ids
