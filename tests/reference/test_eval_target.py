"""sparrow eval-target: lengths -> frames, scoring, resumable records, report files, errors."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict

import pytest

from sparrow.cli import main
from sparrow.reference import eval_target, synthetic
from sparrow.targets import load_target


@pytest.fixture(scope="module")
def tiny():
    return load_target("tiny:llava_onevision")


def test_frames_fill_the_requested_length(tiny):
    frames = eval_target.frames_for_length(tiny, 80)
    tokens = eval_target._tokens(tiny, frames)
    assert tokens <= 80 < eval_target._tokens(tiny, frames + 1)


def test_a_run_scores_every_video_and_resumes_without_redoing_any(tiny, tmp_path, monkeypatch):
    out = tmp_path / "acc"
    rows = eval_target.evaluate(tiny, [40, 80], out, videos=2, max_new_tokens=4, progress=False)
    assert [r["videos"] for r in rows] == [2, 2]
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [(r["length"], r["seed"]) for r in records] == [
        (40, synthetic.EVAL_SEED_START), (40, synthetic.EVAL_SEED_START + 1),
        (80, synthetic.EVAL_SEED_START), (80, synthetic.EVAL_SEED_START + 1)]
    for suffix in (".json", ".md", ".png"):
        assert out.with_suffix(suffix).is_file()
    assert "| 37 |" in out.with_suffix(".md").read_text()

    evaluated = []
    original = eval_target.evaluate_one
    monkeypatch.setattr(eval_target, "evaluate_one",
                        lambda *a, **k: evaluated.append(a[1:3]) or original(*a, **k))
    rows = eval_target.evaluate(tiny, [40, 80], out, videos=3, max_new_tokens=4, progress=False)
    assert evaluated == [(40, synthetic.EVAL_SEED_START + 2), (80, synthetic.EVAL_SEED_START + 2)]
    assert [r["videos"] for r in rows] == [3, 3]


def test_scores_come_from_the_ground_truth(tiny, tmp_path, monkeypatch):
    """A target that answered with the reference description would score 1.0; the report says so."""
    from sparrow import api

    def perfect(target, question, video, **kwargs):
        result = real(target, question, video, max_new_tokens=1)
        seed = int(video_paths[-1].split("/")[-1].split("-")[0])
        facts = synthetic.scene_facts(synthetic.generate_scene(seed, len(video.frame_timestamps), 128, 128))
        return api.Answer(text=synthetic.describe(facts, 0), result=result.result)

    video_paths = []
    real_prepare, real = api.prepare_video, api.answer
    monkeypatch.setattr(api, "prepare_video",
                        lambda t, p, **k: video_paths.append(str(p)) or real_prepare(t, p, **k))
    monkeypatch.setattr(api, "answer", perfect)
    rows = eval_target.evaluate(tiny, [80], tmp_path / "acc", videos=2, progress=False)
    assert rows[0]["score"] == 1.0 and rows[0]["hallucinated_per_video"] == 0
    assert rows[0]["invented_events_per_video"] == 0


def test_distinct_ngrams_detects_loops():
    assert eval_target.distinct_ngrams("a b c d e f") == 1.0
    assert eval_target.distinct_ngrams("the red circle moves " * 10) < 0.15


@pytest.mark.parametrize("args, message", [
    (["--lengths", "10,x"], "integers"),
    (["--lengths", "8"], "fewer than 4 frames"),
    (["--videos", "0"], "at least 1"),
])
def test_eval_target_errors_are_one_line(args, message, capsys, tmp_path):
    assert main(["eval-target", "--target", "tiny:llava_onevision", "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_records_of_another_checkpoint_are_not_reused(tiny, tmp_path):
    out = tmp_path / "acc"
    eval_target.evaluate(tiny, [40], out, videos=1, max_new_tokens=2, progress=False)
    record = out.with_suffix(".jsonl")
    stale = json.loads(record.read_text())
    stale["model"] = "an-older-checkpoint"
    record.write_text(json.dumps(stale) + "\n")
    rows = eval_target.evaluate(tiny, [40], out, videos=1, max_new_tokens=2, progress=False)
    assert rows[0]["videos"] == 1 and len(record.read_text().splitlines()) == 2  # re-evaluated


def _sample(length, seed, score, model="m"):
    return eval_target.Sample(length=length, seed=seed, num_frames=4, num_visual_tokens=length - 3,
                              score=score, correct=0, total=1, hallucinated=0, invented_events=0,
                              by_kind={}, new_tokens=1,
                              distinct_4grams=1.0, prefill_s=0.0, decode_s=0.0, text="", model=model)


def test_paired_difference_pairs_videos_by_length_and_seed():
    new = [_sample(40, 1, 0.5), _sample(40, 2, 0.75), _sample(40, 3, 1.0), _sample(80, 1, 0.25)]
    old = [_sample(40, 2, 0.5), _sample(40, 1, 0.75), _sample(80, 2, 0.0), _sample(40, 9, 0.0)]
    rows = eval_target.paired_difference(new, old)
    assert len(rows) == 1  # 80: no video in common; seeds 3 and 9 unpaired
    row = rows[0]
    assert (row["length"], row["videos"], row["higher"], row["lower"]) == (40, 2, 1, 1)
    assert (row["score"], row["baseline_score"], row["difference"]) == (0.625, 0.625, 0.0)
    assert row["standard_error"] == pytest.approx(0.25)  # diffs -0.25, +0.25: stdev 0.354 / sqrt(2)


def test_a_baseline_file_adds_the_paired_comparison_to_the_report(tiny, tmp_path):
    out = tmp_path / "acc"
    eval_target.evaluate(tiny, [40], out, videos=2, max_new_tokens=2, progress=False)
    older = []
    for i, line in enumerate(out.with_suffix(".jsonl").read_text().splitlines()):
        record = json.loads(line)
        record.update(model="an-older-checkpoint", score=record["score"] - 0.25 * (i + 1))
        older.append(json.dumps(record))
    base = tmp_path / "older.jsonl"
    base.write_text("\n".join(older) + "\n")
    eval_target.evaluate(tiny, [40], out, videos=2, max_new_tokens=2, progress=False, baseline=base)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["baseline"]["model"] == "an-older-checkpoint"
    (row,) = report["baseline_rows"]
    assert row["videos"] == 2 and row["higher"] == 2 and row["difference"] == pytest.approx(0.375)
    assert "an-older-checkpoint" in out.with_suffix(".md").read_text()
    assert "| +0.375 | 0.125 | 2 / 0 |" in out.with_suffix(".md").read_text()


def test_baseline_errors_name_the_file_and_the_fix(tmp_path):
    from sparrow.errors import ConfigError

    with pytest.raises(ConfigError, match="no such file"):
        eval_target.load_records(tmp_path / "missing.jsonl")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(asdict(_sample(40, 1, 0.5, m))) + "\n" for m in ("a", "b")))
    with pytest.raises(ConfigError, match=r"2 checkpoints \(a, b\)"):
        eval_target.load_records(mixed)
    assert [s.model for s in eval_target.load_records(mixed, exclude_model="a")] == ["b"]
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps(asdict(_sample(40, 1, 0.5, "a"))) + "\n")
    with pytest.raises(ConfigError, match="no other checkpoint"):
        eval_target.load_records(own, exclude_model="a")
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n")
    with pytest.raises(ConfigError, match="not eval-target records"):
        eval_target.load_records(junk)


def _render_at_once(cache):
    path, _ = eval_target.video_for(synthetic.EVAL_SEED_START, 24, cache)
    return path.stat().st_size


def test_evaluations_side_by_side_share_the_video_cache(tmp_path, monkeypatch):
    """Processes rendering the same evaluation video at once each publish a whole file (they
    once shared one staging name, and all but the first failed: seen with three checkpoints
    evaluated side by side). Here all four finish writing before any publishes."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    barrier = context.Manager().Barrier(4)
    write = synthetic.write_scene

    def write_then_wait(scene, path):
        written = write(scene, path)
        barrier.wait()
        return written

    monkeypatch.setattr(synthetic, "write_scene", write_then_wait)
    with context.Pool(4) as pool:
        sizes = pool.starmap(_render_at_once, [(tmp_path,)] * 4)
    assert len(set(sizes)) == 1 and sizes[0] > 0
    assert [p.name for p in tmp_path.iterdir()] == [f"{synthetic.EVAL_SEED_START}-24.mp4"]


def test_records_from_before_events_were_counted_get_them_counted_from_their_text(tmp_path):
    """Result files written before `invented_events` existed (the shipped weights' baseline):
    the count comes from the answer's text against the regenerated ground truth."""
    seed, frames = synthetic.EVAL_SEED_START, 31
    facts = synthetic.scene_facts(synthetic.generate_scene(seed, frames, eval_target.FRAME_SIZE,
                                                           eval_target.FRAME_SIZE, eval_target.FPS))
    leaving = {e.object_ids[0] for e in facts.events if e.kind == "leave"}
    stays = next(o for o in facts.objects if o.id not in leaving)
    text = synthetic.describe(facts, 0) + f" The {stays.colour} {stays.shape} leaves."
    record = asdict(dataclasses.replace(_sample(40, seed, 0.5), num_frames=frames, text=text))
    del record["invented_events"]
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps(record) + "\n")
    samples = eval_target.load_records(old)
    assert samples[0].invented_events == 1
    assert eval_target.summarize(samples)[0]["invented_events_per_video"] == 1
    meta = {"target": "t", "date": "d", "device": "cpu", "command": "c", "max_new_tokens": 1}
    eval_target.write_report(tmp_path / "old", samples, meta)
    assert "| 0.00 | 1.00 |" in (tmp_path / "old.md").read_text()
