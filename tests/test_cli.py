"""The command line contract: JSON fields, draft checkpoints, one-line errors without traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparrow.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparrow.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("draft")
    assert main(["draft-init", "--target", "tiny:qwen2_vl", "--out", str(out), "--seed", "1"]) == 0
    return out


def test_generate_json_contract_and_losslessness(draft_dir, video_file, capsys):
    outputs = {}
    for method in ("ar", "sparrow", "eagle"):
        args = ["generate", "--target", "tiny:qwen2_vl", "--video", video_file(6),
                "--num-frames", "6", "--prompt", "What moves?", "--max-new-tokens", "12",
                "--method", method, "--json", "--tree", "10-3-4"]
        if method != "ar":
            args += ["--draft", str(draft_dir)]
        assert main(args) == 0
        outputs[method] = json.loads(capsys.readouterr().out)
    for method, data in outputs.items():
        for key in ("text", "token_ids", "num_visual_tokens", "tau", "target_calls", "timings",
                    "method"):
            assert key in data
        assert set(data["timings"]) >= {"prefill_s", "decode_s", "draft_s", "verify_s"}
        assert data["method"] == method
        assert data["token_ids"] == outputs["ar"]["token_ids"]
        assert data["num_visual_tokens"] > 0
    assert outputs["ar"]["tau"] == 1.0


def test_draft_checkpoint_holds_no_target_weights(draft_dir):
    from safetensors import safe_open

    with safe_open(str(draft_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not any("embed_tokens" in n or "lm_head" in n for n in names)
    config = json.loads((draft_dir / "config.json").read_text())
    assert config["target_model_type"] == "qwen2_vl" and config["mode"] == "sparrow"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--video", "/nonexistent/clip.mp4"], "not found"),
        (["--tree", "30-4"], "--tree"),
        (["--tree", "99-2-3"], "at most"),
        (["--method", "sparrow"], "needs --draft"),
        (["--num-frames", "4", "--fps", "2"], "not both"),
        (["--temperature", "-1"], "temperature"),
    ],
)
def test_user_errors_are_one_line(args, message, capsys):
    assert main(["generate", "--target", "tiny:qwen2_vl", "--prompt", "hi", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def _error_of(capsys, *args) -> str:
    assert main(["generate", "--prompt", "hi", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    return err


def test_corrupt_video_and_mismatched_draft_are_refused(tmp_path, draft_dir, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    assert str(bad) in _error_of(capsys, "--target", "tiny:qwen2_vl", "--video", str(bad))
    err = _error_of(capsys, "--target", "tiny:llava_onevision", "--draft", str(draft_dir))
    assert "qwen2_vl" in err and "llava_onevision" in err


def test_missing_and_damaged_draft(tmp_path, draft_dir, capsys):
    err = _error_of(capsys, "--target", "tiny:qwen2_vl", "--draft", str(tmp_path / "nothing"))
    assert "draft-init" in err
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text((draft_dir / "config.json").read_text())
    (damaged / "model.safetensors").write_bytes(b"not safetensors")
    err = _error_of(capsys, "--target", "tiny:qwen2_vl", "--draft", str(damaged))
    assert "cannot load weights" in err


def test_a_real_process_prints_no_traceback(tmp_path):
    result = run_cli("generate", "--target", "tiny:qwen2_vl", "--prompt", "hi",
                     "--video", str(tmp_path / "missing.mp4"))
    assert result.returncode == 2
    assert result.stderr.startswith("sparrow generate: error:") and "Traceback" not in result.stderr


def test_text_output_and_stats_line(capsys):
    assert main(["generate", "--target", "tiny:llava_onevision", "--prompt", "hello",
                 "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert "[ar] 5 tokens, tau 1.00" in captured.err


@pytest.mark.parametrize("args,message", [
    (["datagen", "--target", "tiny:qwen2_vl", "--out", "{tmp}/d"], "give --prompts FILE"),
    (["datagen", "--target", "tiny:qwen2_vl", "--out", "{tmp}/d", "--prompts", "{tmp}/none.jsonl"],
     "no such file"),
    (["train", "--target", "tiny:qwen2_vl", "--data", "{tmp}", "--out", "{tmp}/o"], "no manifest.json"),
    (["train", "--target", "tiny:qwen2_vl", "--data", "{tmp}", "--out", "{tmp}/o", "--visual", "none",
      "--mode", "eagle"], "runs in --mode sparrow"),
    (["train", "--target", "tiny:qwen2_vl", "--data", "{tmp}", "--out", "{tmp}/o", "--mtp-weights", "1,x"],
     "comma-separated"),
    (["bench", "--target", "tiny:qwen2_vl", "--out", "{tmp}/b", "--lengths", "1k,many"], "not a length"),
    (["bench", "--target", "tiny:qwen2_vl", "--out", "{tmp}/b"], "give --prompts FILE"),
    (["generate", "--target", "tiny:qwen2_vl", "--prompt", "hi", "--draft", "reference:nope"],
     "no such shipped draft"),
])
def test_training_and_bench_commands_refuse_bad_input_in_one_line(tmp_path, args, message):
    result = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bench_preset_paper_fills_what_the_flags_leave_out():
    from sparrow.cli import BENCH_PRESETS, bench_settings, build_parser

    parser, _ = build_parser()

    def settings(*flags):
        return bench_settings(parser.parse_args(["bench", "--target", "reference", "--out", "x", *flags]))

    plain = settings()
    assert (plain.lengths, plain.tree, plain.drafts, plain.videos) == ("0.5k,1.5k", "auto", "", 4)
    paper = settings("--preset", "paper")
    assert paper.lengths == "0.5k,1.5k,6k,17k,25k" and paper.tree == "auto,30-4-8"
    assert paper.temperatures == "0,1" and paper.drafts == BENCH_PRESETS["paper"]["drafts"]
    mine = settings("--preset", "paper", "--lengths", "25k", "--drafts", "runs/msd")
    assert mine.lengths == "25k" and mine.drafts == "reference:sparrow,reference:eagle,runs/msd"
