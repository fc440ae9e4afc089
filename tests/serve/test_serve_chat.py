"""`sparrow chat`: questions piped on stdin, answers streamed, tau per answer."""

from __future__ import annotations

import io
import subprocess
import sys

import sparrow
from sparrow.cli import main
from sparrow.serve.chat import chat


def test_chat_answers_each_question_and_the_first_equals_answer(tmp_path, video_file):
    draft_dir = tmp_path / "draft"
    assert main(["draft-init", "--target", "tiny:qwen2_vl", "--out", str(draft_dir)]) == 0
    video = video_file(8)
    run = subprocess.run(
        [sys.executable, "-m", "sparrow.cli", "chat", "--target", "tiny:qwen2_vl",
         "--draft", str(draft_dir), "--video", video, "--max-new-tokens", "12", "--tree", "10-3-4"],
        input="What moves?\n\nAnd then?\n/quit\nnever asked\n", capture_output=True, text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    target = sparrow.load_target("tiny:qwen2_vl")
    draft = sparrow.load_draft(str(draft_dir), target, mode="sparrow")
    expected = sparrow.answer(target, "What moves?", video, method="sparrow", draft=draft,
                              tree="10-3-4", max_new_tokens=12)
    assert run.stdout.startswith(expected.text + "\n")
    stats = [line for line in run.stderr.splitlines() if "tau" in line]
    assert len(stats) == 2 and all(line.startswith("[sparrow] tau ") for line in stats)


def test_follow_ups_see_the_conversation(video_file):
    target = sparrow.load_target("tiny:qwen2_vl")
    video = sparrow.prepare_video(target, video_file(4), num_frames=4)
    out, err = io.StringIO(), io.StringIO()
    messages = chat(target, video, max_new_tokens=6, stdin=io.StringIO("One?\nTwo?\n"),
                    stdout=out, stderr=err)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"][0] == {"type": "video"} and len(messages[2]["content"]) == 1
    assert out.getvalue() == "".join(m["content"] + "\n" for m in messages[1::2])


def test_chat_missing_video_is_one_line_exit_2():
    run = subprocess.run([sys.executable, "-m", "sparrow.cli", "chat", "--target", "tiny:qwen2_vl",
                          "--video", "/nonexistent.mp4"], input="", capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "not found" in run.stderr
