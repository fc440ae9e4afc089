"""Target adapters: checkpoint loading, prefill outputs, positions across requests, drafts."""

from __future__ import annotations

import pytest
import torch

from sparrow.api import prepare_video
from sparrow.draft import DraftConfig, init_draft, load_draft
from sparrow.errors import CheckpointError
from sparrow.speculative.generate import generate
from sparrow.targets import load_target
from sparrow.targets.tiny import save_tiny_checkpoint
from sparrow.video.prompt import build_video_prompt


def test_prefill_returns_mask_hidden_and_mid_layer_states(target, video_file):
    video = prepare_video(target, video_file(4), num_frames=4)
    input_ids = build_video_prompt(target.tokenizer, target.config, video, "What is it?")
    out = target.prefill(input_ids, video, layers=(0, 1))
    assert int(out.visual_mask.sum()) == video.num_visual_tokens
    assert out.hidden.shape == (input_ids.shape[1], target.hidden_size)
    # Reference: transformers' own forward with all hidden states.
    kwargs = dict(video.model_kwargs())
    if "qwen" in target.config.model_type:
        from sparrow.video.prompt import mm_token_type_ids

        kwargs["mm_token_type_ids"] = mm_token_type_ids(input_ids, target.config)
    kwargs = {key: value.to(target.device) for key, value in kwargs.items()}
    with torch.no_grad(), target.unwrapped() as model:
        ref = model(input_ids.to(target.device), output_hidden_states=True, **kwargs)
    torch.testing.assert_close(out.logits, ref.logits[0, -1], atol=1e-4, rtol=1e-4)
    for layer in (0, 1):
        torch.testing.assert_close(out.layer_hidden[layer], ref.hidden_states[layer][0], atol=1e-5,
                                   rtol=1e-5)
    # The last hidden state feeds lm_head: logits are reproduced from it.
    torch.testing.assert_close(target.lm_head(out.hidden[-1]), out.logits, atol=1e-4, rtol=1e-4)


def test_wrapping_a_model_is_undone_by_unwrap(family):
    """wrap_model changes the model as documented (eval mode, tree-aware attention, packed CPU
    linears) and `unwrapped()` / `unwrap()` give it back exactly as it was."""
    from sparrow.runtime.linear import PackedLinear, available
    from sparrow.targets import wrap_model
    from sparrow.targets.tiny import processor_config, tiny_model, tiny_tokenizer

    model = tiny_model(family).train()
    text_config = model.config.get_text_config()
    attention = text_config._attn_implementation
    classes = [type(module) for module in model.modules()]
    state = {key: value.clone() for key, value in model.state_dict().items()}

    def as_given() -> None:
        assert model.training and text_config._attn_implementation == attention
        assert [type(module) for module in model.modules()] == classes

    target = wrap_model(model, tiny_tokenizer(family), processor_config(family))
    assert not model.training and text_config._attn_implementation == "sparrow"
    assert any(type(module) is PackedLinear for module in model.modules()) == available()
    with target.unwrapped() as given:
        assert given is model
        as_given()
    assert text_config._attn_implementation == "sparrow"  # the adapter's changes are back
    assert target.unwrap() is model
    as_given()
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_no_state_leaks_between_requests(target, video_file):
    """A video request followed by a text-only one (and back) gives the same answers as fresh."""
    video = prepare_video(target, video_file(8), num_frames=8)
    with_video = build_video_prompt(target.tokenizer, target.config, video, "Describe it.")
    text_only = build_video_prompt(target.tokenizer, target.config, None, "Describe it.")
    first = generate(target, with_video, video, max_new_tokens=10).token_ids
    second = generate(target, text_only, None, max_new_tokens=10).token_ids
    again = generate(target, with_video, video, max_new_tokens=10).token_ids
    assert first == again
    fresh = load_target(f"tiny:{target.config.model_type}", device=target.device)
    assert generate(fresh, text_only, None, max_new_tokens=10).token_ids == second


def test_checkpoint_directory_round_trip(tmp_path, video_file):
    directory = save_tiny_checkpoint("qwen2_5_vl", tmp_path / "ckpt")
    from_disk = load_target(directory)
    in_memory = load_target("tiny:qwen2_5_vl")
    assert from_disk.processor_config == in_memory.processor_config
    answers = []
    for target in (from_disk, in_memory):
        video = prepare_video(target, video_file(4), num_frames=4)
        ids = build_video_prompt(target.tokenizer, target.config, video, "Anything?")
        answers.append(generate(target, ids, video, max_new_tokens=8).token_ids)
    assert answers[0] == answers[1]


def test_bad_checkpoint_paths(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_target(tmp_path)
    with pytest.raises(CheckpointError, match="tiny:"):
        load_target("tiny:gpt2")


def test_draft_save_load_and_mismatch(tmp_path):
    target = load_target("tiny:llava_next_video")
    draft = init_draft(target, "eagle", seed=5)
    assert init_draft(target, "eagle", seed=5).fc.weight.equal(draft.fc.weight)  # reproducible
    draft.save(tmp_path / "d")
    loaded = load_draft(tmp_path / "d", target)
    assert loaded.mode == "eagle"
    for name, tensor in draft.state_dict().items():
        assert loaded.state_dict()[name].equal(tensor)
    assert load_draft(tmp_path / "d", target, mode="sparrow").mode == "sparrow"
    other = load_target("tiny:qwen3_vl")
    with pytest.raises(CheckpointError, match="llava_next_video vs qwen3_vl"):
        load_draft(tmp_path / "d", other)
    wrong = DraftConfig.for_target(target)
    wrong.hidden_size += 8
    with pytest.raises(CheckpointError, match="hidden size"):
        from sparrow.draft import check_compatible

        check_compatible(wrong, target)
