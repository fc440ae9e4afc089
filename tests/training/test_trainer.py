"""`sparrow train`: it learns, it resumes exactly, two processes train what one does, and it
refuses data made by another target."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sparrow.draft import load_draft
from sparrow.errors import DataError
from sparrow.training.config import preset
from sparrow.training.trainer import train
from tests.training.conftest import FAMILY

CONFIG = dict(epochs=6.0, stage1_epochs=1.0, batch_size=2, held_out=0.0, eval_every=3,
              checkpoint_every=2, lr=3e-3)


def _weights(directory):
    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("name", ["sparrow", "eagle", "msd", "ablation-vata"])
def test_training_lowers_the_loss_and_writes_a_draft(tiny_target, data_dir, tmp_path, name):
    config = preset(name, **CONFIG)
    summary = train(tiny_target, [data_dir], tmp_path / "d", config, progress=False)
    assert summary["finished"] and summary["steps"] == summary["total_steps"]
    log = [json.loads(line) for line in (tmp_path / "d" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert [r["stage"] for r in log if "loss" in r][0] == 1  # text-only samples first
    assert len(losses) == summary["total_steps"] and losses[-1] < 0.7 * losses[0]
    draft = load_draft(tmp_path / "d", tiny_target)
    assert (draft.config.mode, draft.config.visual) == (config.mode, config.visual)
    assert draft.config.training["preset"] == name
    profile = draft.config.acceptance  # measured after training, for --tree auto
    assert len(profile) == 8 and all(len(row) == 10 and 0 <= sum(row) <= 1.0001 for row in profile)
    assert sum(profile[0]) > 0
    assert (tmp_path / "d" / "loss.png").stat().st_size > 0


def test_an_interrupted_run_resumes_exactly(tiny_target, data_dir, tmp_path):
    config = preset("sparrow", draft_vocab=24, **CONFIG)
    whole = train(tiny_target, [data_dir], tmp_path / "whole", config, progress=False)
    part = train(tiny_target, [data_dir], tmp_path / "parts", config, stop_after=3, progress=False)
    assert not part["finished"] and part["steps"] == 3
    rest = train(tiny_target, [data_dir], tmp_path / "parts", config, progress=False)
    assert rest["finished"] and rest["steps"] == whole["steps"]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "parts")
    assert a.keys() == b.keys() and "vocab" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "whole" / "log.jsonl").read_text() == (tmp_path / "parts" / "log.jsonl").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_the_weights_of_one(data_dir, tmp_path):
    """DDP over gloo, two CPU processes, each half of every global batch of 4."""
    flags = ["--target", f"tiny:{FAMILY}", "--data", str(data_dir), "--preset", "sparrow",
             "--epochs", "3", "--stage1-epochs", "0", "--batch-size", "4", "--held-out", "0",
             "--lr", "3e-3"]
    command = [sys.executable, "-m", "sparrow.cli", "train", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([*command, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    port = str(_free_port())
    procs = [subprocess.Popen([*command, "--out", str(tmp_path / "two")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                   "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert json.loads(outs[0][0].splitlines()[-1])["processes"] == 2
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for key in a:
        # equal up to float summation order (Adam divides by small second moments: atol 1e-4)
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)
    initial = _weights_of_untrained(tmp_path)
    assert any(not torch.allclose(a[k], initial[k]) for k in a)  # it did train


def _weights_of_untrained(tmp_path):
    from sparrow.draft.checkpoint import new_draft
    from sparrow.draft.model import DraftConfig

    config = json.loads((tmp_path / "one" / "config.json").read_text())
    config.pop("training")
    return new_draft(DraftConfig(**config), seed=0).state_dict()


def test_data_of_another_target_is_refused(data_dir, tmp_path):
    from sparrow.targets import load_target

    with pytest.raises(DataError, match="made by target"):
        train(load_target("tiny:qwen2_vl"), [data_dir], tmp_path / "d", preset("sparrow", **CONFIG))


def test_init_from_the_target_copies_its_last_layer(tiny_target, data_dir, tmp_path):
    config = preset("sparrow", **{**CONFIG, "epochs": 0.0, "stage1_epochs": 0.0}, init="target")
    train(tiny_target, [data_dir], tmp_path / "d", config, progress=False)
    weights = _weights(tmp_path / "d")
    source = tiny_target.model.model.language_model.layers[-1].state_dict()
    copied = [k for k in source if f"layer.{k}" in weights]
    assert "mlp.down_proj.weight" in copied
    for key in copied:
        assert torch.equal(weights[f"layer.{key}"], source[key].float()), key


def test_a_trained_draft_ships_in_fp16(tiny_target, data_dir, tmp_path):
    """How the reference target's drafts are shipped: read as saved, written in fp16, loaded
    back as the fp16 values."""
    from safetensors import safe_open

    from sparrow.draft.checkpoint import read_draft, save_draft

    train(tiny_target, [data_dir], tmp_path / "d", preset("eagle", **CONFIG), progress=False)
    save_draft(read_draft(tmp_path / "d"), tmp_path / "fp16", dtype=torch.float16)
    with safe_open(str(tmp_path / "fp16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if k != "vocab"} == {torch.float16}
    full, half = _weights(tmp_path / "d"), load_draft(tmp_path / "fp16", tiny_target).state_dict()
    for key, value in full.items():  # floats as their fp16 values; the vocabulary's ids as they are
        assert torch.equal(half[key], value.half().float() if value.is_floating_point() else value), key
    assert json.loads((tmp_path / "fp16" / "config.json").read_text()) == \
        json.loads((tmp_path / "d" / "config.json").read_text())


def test_the_held_out_tau_and_profile_measure_the_draft_as_it_decodes(tiny_target, data_dir, tmp_path,
                                                                      monkeypatch):
    """A sparrow-mode draft trains with its visual positions carrying layer-m* states (IVSB)
    but decodes over the text alone (VATA): it is evaluated over the text alone."""
    from sparrow.draft.modes import inference_visual
    from sparrow.training import trainer

    assert [inference_visual(m, v) for m, v in [("sparrow", "mid"), ("sparrow", "embed"), ("eagle", "mid"),
                                                ("eagle", "embed"), ("eagle", "none"), ("eagle", "last")]] \
        == ["none", "none", "mid", "embed", "last", "last"]
    direct = []  # per evaluation batch: does it feed visual states? (only `mid`/`embed` batches do)
    for name in ("chain_acceptance", "rank_counts"):
        real = getattr(trainer, name)
        monkeypatch.setattr(trainer, name, lambda draft, batch, *rest, real=real: (
            direct.append(batch.direct is not None) or real(draft, batch, *rest)))
    train(tiny_target, [data_dir], tmp_path / "d", preset("sparrow", **{**CONFIG, "held_out": 0.3}),
          progress=False)
    assert direct and not any(direct)  # held-out tau and acceptance profile: text only
