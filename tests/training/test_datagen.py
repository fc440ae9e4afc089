"""`sparrow datagen`: the target's own answers, the states every recipe needs, resumable with
nothing lost or duplicated, and data refused by another target."""

from __future__ import annotations

import json

import pytest
import torch

from sparrow.api import prepare_video
from sparrow.errors import DataError
from sparrow.speculative.generate import generate
from sparrow.training import datagen as datagen_module
from sparrow.training.data import load_dataset
from sparrow.training.datagen import clean_answer, datagen, target_fingerprint
from sparrow.training.prompts import read_prompts
from sparrow.video.prompt import build_video_prompt
from tests.training.conftest import SETTINGS


def test_samples_hold_the_targets_own_answers_and_states(tiny_target, prompts_file, data_dir):
    target = tiny_target
    prompts = read_prompts(prompts_file)
    dataset = load_dataset([data_dir], target_fingerprint(target))
    assert len(dataset.samples) == len(prompts)
    assert dataset.mid_layer == target.num_layers // 2
    for sample in dataset.samples:
        prompt = prompts[int(sample.key.split("/")[1])]
        video = prepare_video(target, prompt.video, num_frames=prompt.num_frames) if prompt.video else None
        ids = build_video_prompt(target.tokenizer, target.config, video, prompt.question)[0]
        length = ids.shape[0]
        assert torch.equal(sample.input_ids[:length], ids)
        own = generate(target, ids[None], video, max_new_tokens=SETTINGS.max_new_tokens).token_ids
        assert sample.input_ids[length:].tolist() == clean_answer(target, own)
        assert sample.loss_mask.tolist() == [False] * length + [True] * (len(sample.input_ids) - length)
        assert int(sample.visual_mask.sum()) == (video.num_visual_tokens if video else 0)
        out = target.prefill(sample.input_ids, video, layers=(0, dataset.mid_layer))
        torch.testing.assert_close(sample.last.float(), out.hidden, atol=2e-3, rtol=2e-3)
        visual = out.visual_mask
        torch.testing.assert_close(sample.mid.float(), out.layer_hidden[dataset.mid_layer][visual],
                                   atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(sample.embed.float(), out.layer_hidden[0][visual], atol=2e-3, rtol=2e-3)


def test_an_interrupted_run_resumes_to_the_same_files(tiny_target, prompts_file, data_dir, tmp_path,
                                                      monkeypatch):
    write = datagen_module._write_shard
    calls = []

    def interrupted(*args):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        write(*args)

    monkeypatch.setattr(datagen_module, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        datagen(tiny_target, read_prompts(prompts_file), tmp_path / "run", SETTINGS)
    assert len(list((tmp_path / "run").glob("shard-*"))) == 1
    monkeypatch.setattr(datagen_module, "_write_shard", write)
    summary = datagen(tiny_target, read_prompts(prompts_file), tmp_path / "run", SETTINGS)
    assert summary["samples"] == len(read_prompts(prompts_file))
    done = sorted(p.name for p in data_dir.glob("shard-*"))
    assert sorted(p.name for p in (tmp_path / "run").glob("shard-*")) == done
    for name in done:  # byte for byte what the uninterrupted run wrote: nothing lost or twice
        assert (tmp_path / "run" / name).read_bytes() == (data_dir / name).read_bytes()


def test_data_of_another_target_or_settings_is_refused(tiny_target, prompts_file, data_dir, tmp_path):
    from sparrow.targets import load_target

    other = load_target("tiny:qwen2_vl")
    with pytest.raises(DataError, match="made by target"):
        load_dataset([data_dir], target_fingerprint(other))
    with pytest.raises(DataError, match="another target"):
        datagen(other, read_prompts(prompts_file), data_dir, SETTINGS)
    with pytest.raises(DataError, match="another settings"):
        datagen(tiny_target, read_prompts(prompts_file), data_dir,
                datagen_module.DatagenSettings(max_new_tokens=3, batch_size=2))


@pytest.mark.parametrize("line,message", [
    ("not json", "not JSON"),
    ('{"video": "a.mp4"}', "non-empty \"question\""),
    ('{"question": "q", "video": "missing.mp4"}', "does not exist"),
    ('{"question": "q", "frames": 3}', "unknown field"),
    ('{"question": "q", "num_frames": 3}', "without a \"video\""),
])
def test_bad_prompt_files_name_the_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message) as error:
        read_prompts(path)
    assert "line 2" in str(error.value)


def test_draft_vocabulary_is_the_most_frequent_answer_tokens(data_dir):
    from collections import Counter

    from sparrow.training.data import draft_vocabulary

    samples = load_dataset([data_dir]).samples
    counts = Counter(t for s in samples for t in s.input_ids[s.loss_mask].tolist())
    assert draft_vocabulary(samples, 10**6).tolist() == sorted(counts)  # fewer: all of them
    top = draft_vocabulary(samples, 3).tolist()
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    assert top == sorted(t for t, _ in ranked[:3])



def test_restate_keeps_prompts_and_answers_and_swaps_the_mid_layer(tiny_target, prompts_file, data_dir,
                                                                   tmp_path):
    from sparrow.training.datagen import restate

    target = tiny_target
    prompts = read_prompts(prompts_file)
    base = load_dataset([data_dir], target_fingerprint(target))
    layer = target.num_layers  # another m* than the data's L/2
    assert layer != base.mid_layer
    restate(target, data_dir, tmp_path / data_dir.name, layer)  # same name: the same sample keys
    again = load_dataset([tmp_path / data_dir.name], target_fingerprint(target))
    assert again.mid_layer == layer and len(again.samples) == len(base.samples)
    for old, new in zip(base.samples, again.samples, strict=True):
        assert old.key == new.key and torch.equal(old.input_ids, new.input_ids)
        torch.testing.assert_close(new.last.float(), old.last.float(), atol=2e-3, rtol=2e-3)
        prompt = prompts[int(new.key.split("/")[1])]
        video = prepare_video(target, prompt.video, num_frames=prompt.num_frames) if prompt.video else None
        out = target.prefill(new.input_ids, video, layers=(layer,))
        torch.testing.assert_close(new.mid.float(), out.layer_hidden[layer][out.visual_mask],
                                   atol=2e-3, rtol=2e-3)
    assert any(s.mid.shape[0] for s in again.samples)
    again_summary = restate(target, data_dir, tmp_path / data_dir.name, layer)  # all done: nothing to run
    assert again_summary["samples"] == len(base.samples)
    with pytest.raises(DataError, match="another settings"):
        restate(target, data_dir, tmp_path / data_dir.name, 0)
    with pytest.raises(DataError, match="not a datagen output"):
        restate(target, tmp_path / "nothing", tmp_path / "x", layer)
