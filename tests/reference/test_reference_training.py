"""Training the reference target's eyes: labels, conversations, exact resume, export + merge."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
import torch

from sparrow.reference import assembly, smollm2, synthetic
from sparrow.reference.train import caption as caption_stage
from sparrow.reference.train import cli, data
from sparrow.reference.train import long as long_stage
from sparrow.reference.train.align import patch_targets, region_index, train_align, word_embedding
from sparrow.reference.train.batches import (
    CAPTION_FRAMES,
    batches,
    caption_batch,
    frame_spec,
    frame_weights,
    tokenize_conversation,
)
from sparrow.reference.train.caption import (
    caption_loss,
    caption_step,
    describe_score,
    language_states,
    lr_scale,
    train_caption,
)
from sparrow.reference.train.checkpoints import REWARM_STEPS, continue_from
from sparrow.reference.train.data import resize_fn
from sparrow.reference.train.eyes import eyes_view, frame_batch, pooled, train_eyes
from sparrow.reference.train.long import LONG_FRAMES, LONG_POSE_REACH, skip_positions
from sparrow.reference.train.model import LORA_TARGETS, autocast, build_caption_model, export
from sparrow.targets.llava import prompt_positions, video_position_step
from sparrow.video.processing import VideoInputs
from sparrow.video.prompt import render_chat

# The fixture trainer's resume and export paths over the real SmolLM2 body take about a minute
# each; they run with `make test-slow` (the fixture's training is not the product's).
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "train-000.npz"
    tower = assembly.TOWER
    return data.build_shard(path, [3, 4, 5], tower["image_size"], tower["patch_size"], resize_fn(),
                            progress=False)


def test_corpus_is_its_shards_in_order(shard, tmp_path):
    """load_corpus fills one array per field shard by shard; it must equal the shards one after
    the other, facts included."""
    tower = assembly.TOWER
    other = data.build_shard(tmp_path / "train-001.npz", [8, 9], tower["image_size"], tower["patch_size"],
                             resize_fn(), progress=False)
    first, second = data.load_shard(shard), data.load_shard(other)
    corpus = data.load_corpus([shard, other])
    assert [f.seed for f in corpus.facts] == [3, 4, 5, 8, 9]
    for name in data.Shard.__dataclass_fields__:
        if name != "facts":
            expected = np.concatenate([getattr(first, name), getattr(second, name)])
            assert getattr(corpus, name).dtype == expected.dtype
            np.testing.assert_array_equal(getattr(corpus, name), expected, err_msg=name)


def test_patch_labels_name_the_object_under_each_patch():
    scene = synthetic.generate_scene(7, 6, 128, 128)
    labels = data.patch_labels(scene, grid=8)
    assert labels["colour"].shape == (6, 8, 8)
    np.testing.assert_array_equal(labels["count"], scene.visible.sum(axis=1))
    for t in range(scene.num_frames):
        for i, obj in enumerate(scene.objects):
            if not scene.visible[t, i]:
                continue
            cx, cy = scene.positions[t, i]
            row, col = int(cy // 16), int(cx // 16)  # the patch holding the centre (16 px at 128)
            assert labels["shape"][t, row, col] == synthetic.SHAPES.index(obj.shape) + 1
            assert labels["colour"][t, row, col] == scene.colour_ids[t, i] + 1
            assert labels["size"][t, row, col] == data.SIZE_NAMES.index(obj.size) + 1
            np.testing.assert_allclose(labels["centre"][t, row, col], [cx / 128, cy / 128], atol=1e-6)
        # background patches: no object pixel inside them at all
        covered = np.zeros((128, 128), dtype=bool)
        for i, obj in enumerate(scene.objects):
            if scene.visible[t, i]:
                covered |= synthetic.shape_mask(obj.shape, *map(float, scene.positions[t, i]),
                                                scene.radii[i], 128, 128)
        empty = ~covered.reshape(8, 16, 8, 16).any(axis=(1, 3))
        assert (labels["colour"][t][empty] == 0).all()


def test_shard_holds_the_processed_frames_and_facts(shard):
    from sparrow.video.io import read_video
    from sparrow.video.processing import preprocess_video

    loaded = data.load_shard(shard)
    side = assembly.TOWER["image_size"]
    assert loaded.frames.shape == (3, data.RENDER_FRAMES, side, side, 3)
    assert [f.seed for f in loaded.facts] == [3, 4, 5]
    assert loaded.facts[1] == synthetic.scene_facts(synthetic.generate_scene(4, data.RENDER_FRAMES, 128, 128))
    # The stored frames normalize to exactly what the reference processor makes of the mp4.
    scene = synthetic.generate_scene(5, data.RENDER_FRAMES, 128, 128)
    with_path = shard.parent / "5.mp4"
    synthetic.write_scene(scene, with_path)
    config = assembly.reference_config(assembly.TOWER, assembly.ROPE_SCALING)
    expected = preprocess_video(read_video(with_path), config, assembly.PROCESSOR_CONFIG)
    expected = expected.pixel_values_videos[0]  # (T, 3, S, S)
    assert expected.shape[1] == assembly.TOWER["num_channels"] == 6  # frames + temporal differences
    torch.testing.assert_close(data.video_pixels(loaded.frames[2][None])[0], expected, atol=1e-6, rtol=0)
    # A training pair (frame t, frame t - 1) is what the processor feeds the tower for frame t
    # of an 8-frame clip (stride 8 // 8 -> 1).
    pairs = data.pair_pixels(loaded.frames[2][1:], loaded.frames[2][:-1])
    torch.testing.assert_close(pairs, expected[1:], atol=1e-6, rtol=0)


def test_temporal_labels_follow_the_tracks():
    """Every object's centre patch carries its motion since the earlier frame, whether it
    appeared or changed colour; the patch it left carries 'vanished'."""
    checked = {"moving": 0, "appeared": 0, "recoloured": 0, "vanished": 0}
    for seed in range(40):
        scene = synthetic.generate_scene(seed, 8, 128, 128)
        labels = data.patch_labels(scene, grid=8)
        arrays = {k: labels[k][None] for k in ("owner", "positions", "visible", "colour_ids")}
        for now in range(8):
            for before in (max(0, now - 1), max(0, now - 3)):
                out = data.temporal_labels(arrays["owner"], arrays["positions"], arrays["visible"],
                                           arrays["colour_ids"], np.array([now]), np.array([before]))
                for i in range(len(scene.objects)):
                    for frame, name in ((now, None), (before, "vanished")):
                        if not scene.visible[frame, i]:
                            continue
                        cx, cy = scene.positions[frame, i]
                        row, col = int(cy // 16), int(cx // 16)
                        if labels["owner"][frame, row, col] != i + 1:
                            continue  # another object covers its centre
                        if name == "vanished":
                            gone = not scene.visible[now, i]
                            assert out["vanished"][0, row, col] == gone
                            checked["vanished"] += gone
                            continue
                        was = bool(scene.visible[before, i])
                        assert out["appeared"][0, row, col] == (not was)
                        checked["appeared"] += not was
                        if not was:
                            assert out["motion"][0, row, col] == 0
                            continue
                        dx, dy = (scene.positions[now, i] - scene.positions[before, i]) / 128
                        motion = data.MOTIONS[out["motion"][0, row, col] - 1]
                        if max(abs(dx), abs(dy)) < data.MOTION_THRESHOLD:
                            assert motion == "still"
                        else:
                            checked["moving"] += 1
                            expected = (("left" if dx < 0 else "right") if abs(dx) >= abs(dy)
                                        else ("up" if dy < 0 else "down"))
                            assert motion == expected
                        changed = scene.colour_ids[now, i] != scene.colour_ids[before, i]
                        assert out["recoloured"][0, row, col] == changed
                        checked["recoloured"] += changed
    assert all(count > 0 for count in checked.values()), checked  # every kind was exercised


def test_pooled_states_are_what_llava_onevision_hands_the_language_model():
    """The eyes and align stages train on 2x2 block means; LLaVA-OneVision pools the projected
    patches with a bilinear halving of the grid: the same numbers."""
    from types import SimpleNamespace

    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    tower = assembly.TOWER
    holder = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(**tower)))
    grid = tower["image_size"] // tower["patch_size"]
    states = torch.randn(5, grid * grid, 12)
    theirs = LlavaOnevisionModel.apply_pooling(holder, states)
    assert theirs.shape == (5, grid * grid // 4, 12)
    torch.testing.assert_close(pooled(states), theirs)


def test_every_patch_read_gives_each_patch_its_blocks_labels():
    """--eyes-read every-patch: view 4b + k holds patch k of every block of frame b, labelled
    with its block's facts; the four views average to the block means."""
    grid = assembly.TOWER["image_size"] // assembly.TOWER["patch_size"]
    states = torch.randn(2, grid * grid, 3)
    batch = {"pixels": torch.zeros(2, 6, 4, 4), "colour": torch.arange(2 * grid * grid // 4).reshape(2, -1),
             "count": torch.tensor([3, 5])}
    views, labels = eyes_view(states, batch, "every-patch")
    assert views.shape == (8, grid * grid // 4, 3)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                for row in range(grid // 2):
                    for col in range(grid // 2):
                        patch = (2 * row + i) * grid + 2 * col + j
                        block = row * grid // 2 + col
                        assert torch.equal(views[4 * b + 2 * i + j, block], states[b, patch])
    torch.testing.assert_close(views.reshape(2, 4, -1, 3).mean(1), pooled(states))
    assert labels["colour"].tolist() == [batch["colour"][b].tolist() for b in (0, 0, 0, 0, 1, 1, 1, 1)]
    assert labels["count"].tolist() == [3, 3, 3, 3, 5, 5, 5, 5] and labels["pixels"] is batch["pixels"]
    assert eyes_view(states, batch, "block-mean")[0].shape == (2, grid * grid // 4, 3)
    with pytest.raises(ValueError, match="every-patch"):
        eyes_view(states, batch, "per-pixel")


def test_a_block_belongs_to_the_object_covering_most_of_it():
    owner = np.array([[0, 0, 1, 2],
                      [0, 3, 2, 2],
                      [4, 4, 0, 0],
                      [4, 0, 0, 0]])
    blocks, pick = data.block_owner(owner)
    assert blocks.tolist() == [[3, 2], [4, 0]]  # an object beats background; majority wins
    # the first of the block's patches (row-major) that is its object's
    assert pick.tolist() == [[3, 1], [0, 0]]
    assert data.to_blocks(owner)[0, 1].tolist() == [1, 2, 2, 2]


def test_frame_batches_label_each_block_with_its_objects_facts(shard):
    """Block labels are those of the block's object in that frame (colour, shape, size, centre)
    and background where no object is; temporal labels follow the block's object."""
    batch = frame_batch(data.load_shard(shard), np.random.default_rng(0), 64)
    blocks = (assembly.TOWER["image_size"] // assembly.TOWER["patch_size"] // 2) ** 2
    assert batch["colour"].shape == batch["motion"].shape == (64, blocks)
    assert batch["centre"].shape == (64, blocks, 2)
    objects = batch["colour"] > 0
    assert ((batch["shape"] > 0) == objects).all() and ((batch["size"] > 0) == objects).all()
    assert objects.any() and (~objects).any()
    assert (batch["motion"][~objects] == 0).all() and not batch["appeared"][~objects].any()
    assert (batch["motion"][objects] > 0).any()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2.checkpoint())
    tok.chat_template = assembly.CHAT_TEMPLATE
    return tok


@pytest.mark.parametrize("describe_share", [1.0, 0.0])
def test_training_conversations_tokenize_as_the_chat_template_does(tokenizer, describe_share):
    config = assembly.reference_config(assembly.TOWER, assembly.ROPE_SCALING)
    facts = synthetic.scene_facts(synthetic.generate_scene(11, 8, 128, 128))
    messages = data.conversation(facts, random.Random(0), describe_share=describe_share)
    ids, mask = tokenize_conversation(tokenizer, config, messages, num_visual_tokens=33)
    video = VideoInputs(torch.empty(0), None, 33, [], family="llava_onevision")
    whole = render_chat(tokenizer, config, messages, video)[0].tolist()
    generation_prompt = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert whole == ids.tolist() + generation_prompt
    assert ids.tolist().count(config.video_token_index) == 33
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert tokenizer.decode(ids[mask]) == "".join(a + "<|im_end|>" for a in answers)


def test_eyes_training_resumes_exactly(shard, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run in (straight, resumed):
        run.mkdir()
    kwargs = dict(batch=16, lr=1e-3, seed=0, save_every=2, eval_every=100)
    train_eyes(straight, [shard], shard, steps=4, **kwargs)
    train_eyes(resumed, [shard], shard, steps=4, stop_at=2, **kwargs)  # "interrupted" at step 2
    train_eyes(resumed, [shard], shard, steps=4, **kwargs)  # continues from step 2
    a, b = (torch.load(r / "eyes.pt", weights_only=True) for r in (straight, resumed))
    assert a["step"] == b["step"] == 4
    for key in a["tower"]:
        torch.testing.assert_close(a["tower"][key], b["tower"][key], rtol=0, atol=0)
    logged = [json.loads(line) for line in (straight / "eyes.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 4 and 0 <= logged[-1]["val"]["colour_acc"] <= 1
    with pytest.raises(SystemExit, match="--eyes-read every-patch"):  # another read would not resume it
        train_eyes(resumed, [shard], shard, steps=6, read="block-mean", **kwargs)


@SLOW
def test_caption_training_resumes_exactly_and_exports_mergeable_weights(shard, tmp_path):
    """Two caption steps straight vs one + resume (the resumed sitting with its batches built
    in worker processes) give the same weights; the exported file assembles into SmolLM2 +
    scale * B @ A, and removing the LoRA gives SmolLM2 back."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run in (straight, resumed):
        run.mkdir()
        train_eyes(run, [shard], shard, steps=1, batch=8, lr=1e-3, seed=0, save_every=1, eval_every=100)
    kwargs = dict(budget=200, lr=1e-3, projector_lr=1e-3, rank=2, seed=0, save_every=1, eval_every=0)
    train_caption(straight, steps=2, **kwargs)
    train_caption(resumed, steps=2, stop_at=1, **kwargs)
    train_caption(resumed, steps=2, workers=2, **kwargs)
    a, b = (torch.load(r / "caption.pt", weights_only=True) for r in (straight, resumed))
    assert a["step"] == b["step"] == 2
    for key in a["trainable"]:
        torch.testing.assert_close(a["trainable"][key], b["trainable"][key], rtol=0, atol=0)
    assert any(v.abs().sum() > 0 for k, v in a["trainable"].items() if "lora_B" in k)  # it trained

    weights = export(straight, tmp_path / "eyes.safetensors")
    state, lora, scale = assembly.read_weights(weights)
    assert scale == 2.0 and len(lora) == 30 * len(LORA_TARGETS)
    model, _, processor = assembly.build_shipped(weights)
    # the file records the shapes it was trained for, and assembly follows them
    assert assembly.weights_setup(weights) == (assembly.TOWER, assembly.ROPE_SCALING,
                                                assembly.PROCESSOR_CONFIG, assembly.VIDEO_POSITION_STEP)
    assert video_position_step(model.config) == assembly.VIDEO_POSITION_STEP
    assert processor == assembly.PROCESSOR_CONFIG
    from transformers import AutoModelForCausalLM

    smol = AutoModelForCausalLM.from_pretrained(smollm2.checkpoint(), dtype=torch.float32)
    name = "model.language_model.layers.3.mlp.down_proj"
    a_, b_ = lora[name]
    expected = smol.model.layers[3].mlp.down_proj.weight + scale * (b_.float() @ a_.float())
    torch.testing.assert_close(model.get_submodule(name).weight, expected)
    torch.testing.assert_close(model.model.vision_tower.state_dict()["post_layernorm.weight"],
                               state["model.vision_tower.post_layernorm.weight"])
    assembly.merge_lora(model, lora, scale, sign=-1.0)
    torch.testing.assert_close(model.get_submodule(name).weight, smol.model.layers[3].mlp.down_proj.weight,
                               atol=1e-6, rtol=0)


@SLOW
def test_long_stage_starts_from_the_caption_weights_resumes_exactly_and_is_exported(shard, tmp_path,
                                                                                 monkeypatch):
    # The straight run also evaluates after every step (a held-out check must neither end the
    # stage, as a variable it shadowed once did, nor change the training).
    describe = describe_score
    monkeypatch.setattr(caption_stage, "describe_score", lambda *a, **k: describe(*a, **k, max_new_tokens=3))
    runs = [tmp_path / "straight", tmp_path / "resumed"]
    kwargs = dict(budget=200, lr=1e-3, projector_lr=1e-3, rank=2, seed=0, save_every=1, eval_every=0)
    for run in runs:
        run.mkdir()
        train_eyes(run, [shard], shard, steps=1, batch=8, lr=1e-3, seed=0, save_every=1, eval_every=100)
        train_caption(run, steps=1, **kwargs)
    long = dict(kwargs, stage="long", frames={4: 1, 6: 1}, warmup=1, pose_reach=3000)
    train_caption(runs[0], steps=2, **dict(long, eval_every=1, eval_frames=((4, 1),)))
    train_caption(runs[1], steps=2, stop_at=1, **long)
    train_caption(runs[1], steps=2, **long)
    caption = torch.load(runs[0] / "caption.pt", weights_only=True)
    a, b = (torch.load(r / "long.pt", weights_only=True) for r in runs)
    assert a["step"] == b["step"] == 2 and caption["step"] == 1  # the caption stage is left alone
    for key in a["trainable"]:
        torch.testing.assert_close(a["trainable"][key], b["trainable"][key], rtol=0, atol=0)
    assert any(not torch.equal(a["trainable"][k], caption["trainable"][k]) for k in a["trainable"])
    logged = [json.loads(line) for line in (runs[0] / "long.jsonl").read_text().splitlines()]
    assert [r["frames"] for r in logged if "loss" in r] and all(r["frames"] in (4, 6) for r in logged
                                                              if "loss" in r)
    assert [r["step"] for r in logged if "eval_score" in r] == [1, 2]
    assert all(r["invented_events"] >= 0 for r in logged if "eval_score" in r)
    with pytest.raises(SystemExit, match="position reach 3000, not 0"):  # a stage keeps its reach
        train_caption(runs[1], steps=3, **dict(long, pose_reach=0))
    with pytest.raises(SystemExit, match="video position step 0.25, not 1.0"):  # ... and its positions
        train_caption(runs[1], steps=3, **dict(long, video_position_step=1.0))

    from safetensors import safe_open

    weights = export(runs[0], tmp_path / "eyes.safetensors")
    with safe_open(str(weights), "pt") as file:
        assert file.metadata()["caption_steps"] == "1" and file.metadata()["long_steps"] == "2"
        assert file.metadata()["long_pose_reach"] == "3000" and "caption_pose_reach" not in file.metadata()
        assert file.metadata()["video_position_step"] == "0.25" == str(assembly.VIDEO_POSITION_STEP)
        key = next(k for k in a["trainable"] if "lora_B" in k)
        layer, _, rest = key.partition(".lora_")
        torch.testing.assert_close(file.get_tensor(f"{layer}.lora_{rest[0]}"),
                                   a["trainable"][key].to(torch.float16))


@SLOW
def test_a_sitting_continues_from_exported_weights(shard, tmp_path):
    """Only the repository outlives a session here, so long runs go on from the exported file:
    the new run starts at the file's step with its weights (LoRA as stored, fp16), fresh AdamW
    moments and a re-warmed learning rate, resumes exactly within the sitting, and the next
    export records where the optimizer started fresh."""
    first = tmp_path / "first"
    first.mkdir()
    train_eyes(first, [shard], shard, steps=1, batch=8, lr=1e-3, seed=0, save_every=1, eval_every=100)
    kwargs = dict(budget=200, lr=1e-3, projector_lr=1e-3, rank=2, seed=0, save_every=1, eval_every=0)
    train_caption(first, steps=3, stop_at=1, **kwargs)
    weights = export(first, tmp_path / "sitting-1.safetensors")

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert continue_from(weights, straight, rank=2) == "caption"
    original, seeded = (torch.load(r / "caption.pt", weights_only=True) for r in (first, straight))
    assert seeded["step"] == 1 and "optimizer" not in seeded
    assert original["trainable"].keys() == seeded["trainable"].keys()
    for key, value in original["trainable"].items():
        expected = value.to(torch.float16).float() if "lora_" in key else value
        torch.testing.assert_close(seeded["trainable"][key], expected, rtol=0, atol=0)
    tower = torch.load(first / "eyes.pt", weights_only=True)["tower"]
    for key, value in torch.load(straight / "eyes.pt", weights_only=True)["tower"].items():
        torch.testing.assert_close(value, tower[key], rtol=0, atol=0)

    train_caption(straight, steps=3, **kwargs)
    continue_from(weights, resumed, rank=2)
    train_caption(resumed, steps=3, stop_at=2, **kwargs)  # interrupted within the sitting
    assert continue_from(weights, resumed, rank=2) == "caption"  # seeded already: left alone
    train_caption(resumed, steps=3, **kwargs)
    a, b = (torch.load(r / "caption.pt", weights_only=True) for r in (straight, resumed))
    assert a["step"] == b["step"] == 3 and a["fresh_optimizer_at"] == b["fresh_optimizer_at"] == [0, 1]
    for key in a["trainable"]:
        torch.testing.assert_close(a["trainable"][key], b["trainable"][key], rtol=0, atol=0)
    assert any(not torch.equal(a["trainable"][k], seeded["trainable"][k]) for k in a["trainable"])
    logged = [json.loads(line) for line in (straight / "caption.jsonl").read_text().splitlines()]
    precision = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    assert logged[0] == {"step": 1, "start": {"cpu": torch.backends.cpu.get_cpu_capability(), "threads":
                                              torch.get_num_threads(), "precision": precision,
                                              "fresh_optimizer_at": [0, 1], "pose_reach": 0,
                                              "video_position_step": 0.25,
                                              "frames": "4:2,8:3,12:2,16:2,24:1,32:1,48:1,64:1"}}
    logged = logged[1:]
    assert [r["step"] for r in logged] == [2, 3]
    for record in logged:  # step s (1-based) is schedule step s - 1, re-warmed from step 1
        step = record["step"] - 1
        expected = 1e-3 * lr_scale(step, 3, 50) * min(1.0, (step - 1 + 1) / REWARM_STEPS)
        assert record["lr"] == pytest.approx(expected)

    from safetensors import safe_open

    with safe_open(str(export(straight, tmp_path / "sitting-2.safetensors")), "pt") as file:
        assert file.metadata()["caption_steps"] == "3"
        assert file.metadata()["caption_fresh_optimizer_at"] == "0,1"
    # a sitting may go on with other video positions (same weights; the export records the new step)
    assert continue_from(weights, tmp_path / "plain", rank=2, video_position_step=1.0) == "caption"
    assert torch.load(tmp_path / "plain" / "caption.pt", weights_only=True)["video_position_step"] == 1.0
    with safe_open(str(export(tmp_path / "plain", tmp_path / "plain.safetensors")), "pt") as file:
        assert file.metadata()["video_position_step"] == "1.0"
    assert assembly.weights_setup(tmp_path / "plain.safetensors")[3] == 1.0
    with pytest.raises(SystemExit, match="--rank 4"):
        continue_from(weights, tmp_path / "other", rank=4)
    with pytest.raises(SystemExit, match="no such file"):
        continue_from(tmp_path / "missing.safetensors", tmp_path / "other", rank=2)
    with pytest.raises(SystemExit, match="not an eyes stage"):
        train_eyes(straight, [shard], shard, steps=2, batch=8, lr=1e-3, seed=0, save_every=1,
                      eval_every=100)


@SLOW
def test_a_caption_stage_on_new_eyes_can_start_from_an_earlier_adapter(shard, tmp_path):
    """--lora-from: the new run's caption stage starts with the file's LoRA factors (fp16 as
    stored) and its own tower / projector; the file's name is logged, kept across a resume and
    exported; a file of another rank is refused, as is --lora-from beside --continue-from."""
    from safetensors import safe_open

    old, new = tmp_path / "old", tmp_path / "new"
    kwargs = dict(budget=200, lr=1e-3, projector_lr=1e-3, rank=2, seed=0, save_every=1, eval_every=0)
    for run, seed in ((old, 0), (new, 1)):
        run.mkdir()
        train_eyes(run, [shard], shard, steps=1, batch=8, lr=1e-3, seed=seed, save_every=1, eval_every=100)
    train_caption(old, steps=2, **kwargs)
    weights = export(old, tmp_path / "old.safetensors")
    trained = torch.load(old / "caption.pt", weights_only=True)["trainable"]

    # A zero learning rate leaves the starting point in the checkpoint.
    train_caption(new, steps=2, stop_at=1, lora_weights=weights, **dict(kwargs, lr=0.0, projector_lr=0.0))
    started = torch.load(new / "caption.pt", weights_only=True)
    model, _ = build_caption_model(new / "eyes.pt", rank=2)
    initial = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lora = [k for k in trained if "lora_" in k]
    assert lora and any("lora_B" in k for k in lora)
    for key in lora:
        torch.testing.assert_close(started["trainable"][key], trained[key].to(torch.float16).float(),
                                   rtol=0, atol=0)
    projector = next(k for k in trained if "multi_modal_projector" in k)
    torch.testing.assert_close(started["trainable"][projector], initial[projector], rtol=0, atol=0)
    assert not torch.equal(started["trainable"][projector], trained[projector])
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    assert started["lora_from"] == f"old.safetensors (sha256 {digest})"

    train_caption(new, steps=2, lora_weights=weights, **kwargs)  # resumes: the file is not read again
    logged = [json.loads(line) for line in (new / "caption.jsonl").read_text().splitlines()]
    assert [r["start"]["lora_from"] for r in logged if "start" in r] == [started["lora_from"]] * 2
    resumed = torch.load(new / "caption.pt", weights_only=True)
    assert resumed["step"] == 2 and any(not torch.equal(resumed["trainable"][k], started["trainable"][k])
                                        for k in lora)
    exported = export(new, tmp_path / "new.safetensors")
    with safe_open(str(exported), "pt") as file:
        assert file.metadata()["caption_lora_from"] == started["lora_from"]
    continue_from(exported, tmp_path / "next", rank=2)  # a later sitting keeps the provenance
    with safe_open(str(export(tmp_path / "next", tmp_path / "next.safetensors")), "pt") as file:
        assert file.metadata()["caption_lora_from"] == started["lora_from"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "eyes.pt").write_bytes((new / "eyes.pt").read_bytes())
    with pytest.raises(SystemExit, match="LoRA rank 2, not --rank 4"):
        train_caption(other, steps=1, lora_weights=weights, **dict(kwargs, rank=4))
    with pytest.raises(SystemExit, match="give one of them"):
        cli.main([str(other), "--continue-from", str(weights), "--lora-from", str(weights)])


def test_continuing_a_long_stage_file_goes_on_with_the_long_stage_alone(tmp_path, monkeypatch):
    """A file past its caption stage (which may have run fewer caption steps than
    --caption-steps' default) must not reopen that stage: `--continue-from FILE` trains the long stage, then
    exports; `--stage caption` with such a file says what to run instead."""
    ran, run = [], [str(tmp_path / "run"), "--continue-from", str(tmp_path / "w.safetensors")]
    monkeypatch.setattr(cli, "continue_from", lambda weights, run, rank, step, reach: "long")
    monkeypatch.setattr(cli, "train_caption", lambda run, steps, *a, stage="caption", **k: ran.append(stage))
    monkeypatch.setattr(cli, "export", lambda run, out: ran.append("export") or out)
    cli.main([*run, "--long-steps", "300"])
    assert ran == ["long", "export"]
    with pytest.raises(SystemExit, match="past its caption stage; go on with --stage long"):
        cli.main([*run, "--stage", "caption"])
    monkeypatch.setattr(cli, "continue_from", lambda weights, run, rank, step, reach: "caption")
    ran.clear()
    cli.main(run)
    assert ran == ["caption", "long", "export"]  # a caption-stage file goes on through both


def test_missing_weights_say_how_to_make_them(tmp_path):
    from sparrow.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"python -m sparrow\.reference\.train"):
        assembly.checkpoint(tmp_path / "nope.safetensors")


def test_caption_batches_fill_a_token_budget_with_one_frame_count(tokenizer, tmp_path):
    config = assembly.reference_config(assembly.TOWER, assembly.ROPE_SCALING)
    resize = resize_fn()
    for step in range(3):
        batch = caption_batch(tokenizer, config, resize, tmp_path, seed=1, step=step, budget=900,
                                  per_frame=16)
        size, frames = batch["pixel_values_videos"].shape[:2]
        assert frames in CAPTION_FRAMES and batch["pixel_values_videos"].shape[2:] == (6, 128, 128)
        assert size == 1 or int(batch["attention_mask"].sum()) <= 900
        video_tokens = (batch["input_ids"] == config.video_token_index).sum(dim=1)
        assert video_tokens.tolist() == [frames * 16 + 1] * size
        assert batch["labels"].any(dim=1).all()  # every conversation has tokens to learn
    assert not list(tmp_path.iterdir())  # rendered clips are cleaned up


def test_skip_positions_keep_order_and_pieces_and_reach_the_distances_asked_for():
    rng = random.Random(0)
    assert torch.equal(skip_positions(50, 50, rng), torch.arange(50))  # nothing to spread
    farthest = 0
    for chunks, within in ((2, None), (3, None), (2, range(30, 60))):
        for _ in range(200):
            positions = skip_positions(100, 1000, rng, within, chunks)
            steps = positions[1:] - positions[:-1]
            assert positions[0] == 0 and int(positions[-1]) < 1000 and (steps >= 1).all()
            assert int((steps > 1).sum()) <= chunks - 1  # consecutive inside each piece
            if within:
                assert (steps[:29] == 1).all() and (steps[59:] == 1).all()  # a piece starts within
            farthest = max(farthest, int(positions[-1]))
    assert farthest > 950  # relative distances near the whole reach are trained


@pytest.mark.parametrize("video_step", [1.0, 0.25])
def test_pose_batches_are_the_same_conversations_with_some_rows_spread(tokenizer, tmp_path, video_step):
    """Rows carry the positions inference gives their prompt (`prompt_positions`: visual tokens
    advance by the model's video position step), and PoSE moves some rows on inside the video."""
    config = assembly.reference_config(assembly.TOWER, assembly.ROPE_SCALING, video_step)
    resize = resize_fn()
    spread = plain = 0
    for step in range(4):
        args = (tokenizer, config, resize, tmp_path, 1, step, 900, 16, {4: 1}, "long")
        batch, without = caption_batch(*args, pose_reach=5000), caption_batch(*args)
        assert ("position_ids" in without) == (video_step != 1)
        for key, value in without.items():
            if key != "position_ids":
                assert torch.equal(batch[key], value), key
        for row, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
            ids = batch["input_ids"][row, :length]
            own = prompt_positions(ids, config.video_token_index, video_step)[0][0]
            positions = batch["position_ids"][row, :length]
            if video_step != 1:
                assert torch.equal(without["position_ids"][row, :length], own)
            if torch.equal(positions, own):
                plain += 1
            else:
                spread += 1
                assert float(positions[-1]) < 5000 and (positions[1:] > positions[:-1]).all()
                video = (ids == config.video_token_index).nonzero()[:, 0]
                jump = positions - own
                cut = int((jump[1:] != jump[:-1]).nonzero()[0]) + 1
                assert video[0] < cut <= video[-1]  # frames are skipped, never words
                assert (jump[cut:] == jump[cut]).all() and jump[cut] > 0  # one skip (2 pieces)
    assert spread and plain  # POSE_SHARE of the rows, not all or none


def test_align_targets_are_the_words_for_what_is_on_each_patch(tokenizer):
    embeddings = torch.randn(tokenizer.vocab_size + 20, 8)
    batch = {
        "colour": torch.tensor([[0, 1 + synthetic.COLOUR_NAMES.index("red")]]),
        "shape": torch.tensor([[0, 1 + synthetic.SHAPES.index("circle")]]),
        "size": torch.tensor([[0, 1 + data.SIZE_NAMES.index("small")]]),
        "background": torch.tensor([synthetic.BACKGROUND_KINDS.index("noise")]),
        "background_colours": torch.tensor([[float(c == "beige") for c in data.BACKGROUND_COLOUR_NAMES]]),
        "centre": torch.tensor([[[0.0, 0.0], [0.9, 0.2]]]),  # the circle's centre: top right
    }
    target = patch_targets(tokenizer, embeddings, batch)  # (1, 2, 8)
    word = lambda w: word_embedding(tokenizer, embeddings, w)  # noqa: E731
    where = (word("top") + word("right")) / 2
    torch.testing.assert_close(target[0, 1], (word("small") + word("red") + word("circle") + where) / 4)
    torch.testing.assert_close(target[0, 0], (word("beige") + word("noisy")) / 2)


def test_region_index_reads_points_as_the_descriptions_do():
    points = torch.rand(500, 2, generator=torch.Generator().manual_seed(0))
    points[:4] = torch.tensor([[1 / 3, 0.5], [2 / 3, 2 / 3], [0.0, 1.0], [0.5, 1 / 3]])  # edges
    expected = [synthetic.REGIONS.index(synthetic.region_of(float(x), float(y))) for x, y in points]
    assert region_index(points).tolist() == expected


def test_align_stage_brings_visual_tokens_towards_the_words_and_seeds_the_caption_model(shard, tmp_path):
    train_eyes(tmp_path, [shard], shard, steps=1, batch=8, lr=1e-3, seed=0, save_every=1, eval_every=100)
    train_align(tmp_path, [shard], shard, steps=30, batch=24, lr=3e-3, seed=0, eval_every=10)
    lines = (tmp_path / "align.jsonl").read_text().splitlines()
    errors = [json.loads(line)["val_relative_error"] for line in lines]
    assert errors[-1] < 0.8 * errors[0], errors
    assert all(0 <= json.loads(line)["val_region_accuracy"] <= 1 for line in lines)
    model, _ = build_caption_model(tmp_path / "eyes.pt", rank=2)
    aligned = torch.load(tmp_path / "align.pt", weights_only=True)["projector"]
    for name, value in aligned.items():
        torch.testing.assert_close(model.model.multi_modal_projector.state_dict()[name], value)


def test_batches_built_by_workers_are_those_built_here(tokenizer, tmp_path):
    config = assembly.reference_config(assembly.TOWER, assembly.ROPE_SCALING)
    args = (tokenizer, config, resize_fn(), tmp_path, 3)
    kwargs = dict(budget=900, per_frame=16, frames={4: 1, 8: 1}, stage="long", pose_reach=3000)
    here, ahead = (list(batches(5, 8, workers, *args, **kwargs)) for workers in (0, 2))
    assert len(here) == len(ahead) == 3
    for a, b, step in zip(here, ahead, range(5, 8), strict=True):
        expected = caption_batch(*args[:-1], seed=3, step=step, **kwargs)
        for batch in (a, b):
            assert batch.keys() == expected.keys()
            for key in batch:
                assert torch.equal(batch[key], expected[key]), key


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_asking_for_a_gpu_where_there_is_none_says_so(tmp_path):
    with pytest.raises(SystemExit, match="--device cuda: this machine has no CUDA device"):
        cli.main([str(tmp_path / "run"), "--stage", "long", "--device", "cuda"])


def test_language_model_stages_use_bf16_only_where_the_cpu_has_it():
    a = torch.ones(4, 4)
    with autocast(native_bf16=True):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(native_bf16=False):
        assert (a @ a).dtype == torch.float32
    with autocast():  # this machine's answer
        expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
        assert (a @ a).dtype == expected


def test_language_model_stages_warm_up_hold_then_decay_over_the_last_third():
    scales = [lr_scale(step, 300, 10) for step in range(300)]
    assert scales[0] == pytest.approx(0.1) and scales[9] == 1.0
    assert set(scales[9:200]) == {1.0}  # constant until two thirds of the steps
    assert all(a > b for a, b in zip(scales[200:], scales[201:], strict=False))
    assert scales[-1] == pytest.approx(0.1, abs=1e-3)


def _caption_model_with_acting_adapters(shard, run):
    """A caption model on one-step eyes, its LoRA B factors drawn (peft starts them at zero,
    where the adapters would change nothing)."""
    train_eyes(run, [shard], shard, steps=1, batch=8, lr=1e-3, seed=0, save_every=1, eval_every=100)
    model, tokenizer = build_caption_model(run / "eyes.pt", rank=2)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(0))
    return model, tokenizer


@pytest.mark.parametrize("pose_reach", [0, 6000])
def test_caption_loss_of_a_padded_batch_is_that_of_its_conversations_alone(shard, tmp_path, pose_reach,
                                                                         monkeypatch):
    """caption_loss leaves out the padding mask (right padding, causal attention): the batch's
    loss must still be the label-weighted mean of each conversation's loss computed unpadded,
    also with PoSE's position ids (they must reach the language model, and pads' must not matter)."""
    import torch.nn.functional as F

    monkeypatch.setattr(long_stage, "POSE_SHARE", 1.0)  # every row spread (with pose_reach)
    model, tokenizer = _caption_model_with_acting_adapters(shard, tmp_path)
    batch = caption_batch(tokenizer, model.config, resize_fn(), tmp_path, seed=0, step=0,
                              budget=900, per_frame=16, frames={4: 1}, pose_reach=pose_reach)
    lengths = batch["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) > 1  # rows of different lengths: some are padded
    positions = batch.get("position_ids", torch.arange(batch["input_ids"].shape[1]).repeat(len(lengths), 1))
    model.eval()
    with torch.no_grad():
        padded = caption_loss(model, batch)
        if pose_reach:  # the spread rows change the loss
            assert not (positions == torch.arange(positions.shape[1])).all()
            assert caption_loss(model, {k: v for k, v in batch.items() if k != "position_ids"}) != padded
            # ... and each piece reads the pieces before it: a skip is not a new sequence (the
            # packed-sequence reading transformers gives position ids that jump, without a mask)
            states = language_states(model, batch)
            changed = dict(batch, input_ids=batch["input_ids"].clone())
            changed["input_ids"][:, 0] = tokenizer.convert_tokens_to_ids("!")  # first token of every row
            moved = (language_states(model, changed) - states).abs().amax(dim=-1)  # (B, L)
            step = video_position_step(model.config)
            for row, length in enumerate(lengths.tolist()):
                own = prompt_positions(batch["input_ids"][row, :length], model.config.video_token_index, step)
                jump = positions[row, :length] - own[0][0]  # the skip PoSE added
                cut = int((jump[1:] != jump[:-1]).nonzero()[0]) + 1
                assert (moved[row, cut:length] > 1e-4).all(), (row, cut)
        total, count = 0.0, 0
        for row, length in enumerate(lengths.tolist()):
            ids = batch["input_ids"][row:row + 1, :length]
            pixels = batch["pixel_values_videos"][row:row + 1]
            hidden = model.model(input_ids=ids, pixel_values_videos=pixels,
                                 position_ids=positions[row:row + 1, :length]).last_hidden_state
            predict = batch["labels"][row:row + 1, 1:length]
            logits = model.lm_head(hidden[:, :-1][predict])
            total += float(F.cross_entropy(logits.float(), ids[:, 1:][predict], reduction="sum"))
            count += int(predict.sum())
    assert padded.item() == pytest.approx(total / count, rel=1e-5)


def test_a_clip_too_long_to_backpropagate_through_trains_its_conversations_after_a_frozen_prefix(
        shard, tmp_path, monkeypatch):
    """Clips of more than FULL_GRADIENT_FRAMES frames: one clip and several conversations about
    it after one shared prefix, no PoSE; `frozen_prefix_step` gives caption_loss's value on the
    same conversations, gradients into the language model's adapters only, and a step along them
    lowers it."""
    import contextlib

    monkeypatch.setattr(long_stage, "FULL_GRADIENT_FRAMES", 3)  # a 4-frame clip stands for a long one
    monkeypatch.setattr(long_stage, "autocast", lambda device: contextlib.nullcontext())  # fp32: exact
    model, tokenizer = _caption_model_with_acting_adapters(shard, tmp_path)
    batch = caption_batch(tokenizer, model.config, resize_fn(), tmp_path, seed=0, step=0,
                              budget=400, per_frame=16, frames={4: 1}, stage="long", pose_reach=6000)
    ids, cut = batch["input_ids"], int(batch["prefix_length"])
    rows, lengths = len(ids), batch["attention_mask"].sum(dim=1)
    assert rows > 1 and batch["pixel_values_videos"].shape[:2] == (1, 4)  # one clip, read once
    assert (ids[:, :cut] == ids[:1, :cut]).all() and int(ids[0, cut - 1]) == model.config.video_token_index
    assert int((ids[0, :cut] == model.config.video_token_index).sum()) == 4 * 16 + 1
    assert int((lengths - cut).sum()) <= 400  # the budget counts the words after the video
    step = video_position_step(model.config)
    for row, length in enumerate(lengths.tolist()):  # no PoSE: the positions inference gives
        own = prompt_positions(ids[row, :length], model.config.video_token_index, step)[0][0]
        assert torch.equal(batch["position_ids"][row, :length], own)
    whole = {k: v for k, v in batch.items() if k != "prefix_length"}
    whole["pixel_values_videos"] = batch["pixel_values_videos"].repeat(rows, 1, 1, 1, 1)
    with torch.no_grad():
        expected = caption_loss(model, whole).item()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = caption_step(model, batch)
    assert loss == pytest.approx(expected, rel=1e-5)
    lora = {n: p.grad for n, p in trainable.items() if "lora_" in n}
    assert all(g is not None for g in lora.values()) and sum(float(g.abs().sum()) for g in lora.values()) > 0
    assert all(p.grad is None for n, p in trainable.items() if "lora_" not in n)  # projector, newline
    with torch.no_grad():
        for g, p in ((p.grad, p) for p in trainable.values() if p.grad is not None):
            p -= 1e-2 * g / g.norm().clamp_min(1e-12)
    model.zero_grad(set_to_none=True)
    assert caption_step(model, batch) < loss


def test_the_long_stage_spreads_positions_by_default_and_can_be_told_not_to():
    parser = cli.build_parser()
    assert parser.parse_args(["run"]).long_pose_reach == LONG_POSE_REACH == 7000
    # ... which covers a 25,600-token video at the default video position step, with its prompt
    assert 25_600 * assembly.VIDEO_POSITION_STEP + 300 < LONG_POSE_REACH
    assert parser.parse_args(["run", "--long-pose-reach", "0"]).long_pose_reach == 0


def test_the_video_position_step_is_the_reference_targets_unless_told(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["run"]).video_position_step == assembly.VIDEO_POSITION_STEP == 0.25
    assert parser.parse_args(["run", "--video-position-step", "1"]).video_position_step == 1.0
    for bad in ("0", "1.5", "0.3", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["run", "--video-position-step", bad])
        assert "--video-position-step" in capsys.readouterr().err


def test_long_stage_clip_lengths_are_given_as_frames_and_weights(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["run"]).long_frames == LONG_FRAMES
    assert parser.parse_args(["run", "--long-frames", "8:3, 384:1"]).long_frames == {8: 3, 384: 1}
    assert frame_weights(frame_spec(LONG_FRAMES)) == LONG_FRAMES  # the form logs record
    for bad in ("8", "8:0", "x:1", ""):
        with pytest.raises(SystemExit):
            parser.parse_args(["run", "--long-frames", bad])
        assert "FRAMES:WEIGHT pairs" in capsys.readouterr().err
