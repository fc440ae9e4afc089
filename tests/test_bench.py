"""`sparrow bench`: AR and drafts on the same videos, one prefill each, resumable cells, and a
report whose numbers come from those cells."""

from __future__ import annotations

import json

import pytest

from sparrow.bench import CELLS, cases_from_prompts, parse_lengths, parse_trees, run_bench, summarize
from sparrow.draft import init_draft
from sparrow.errors import ConfigError
from sparrow.training.prompts import read_prompts


@pytest.fixture
def setup(tmp_path, video_file):
    from sparrow.targets import load_target

    target = load_target("tiny:llava_onevision")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"question": q, "video": video_file(8, i)}) + "\n"
                               for i, q in enumerate(["What happens?", "Describe it."])))
    for mode in ("sparrow", "eagle"):
        init_draft(target, mode, seed=1).save(tmp_path / mode)
    return target, read_prompts(prompts), [str(tmp_path / m) for m in ("sparrow", "eagle")]


def test_bench_runs_every_cell_once_and_resumes(setup, tmp_path):
    target, prompts, drafts = setup
    cases = cases_from_prompts(target, prompts, [100, 200])
    assert [c.num_frames for c in cases][0] < [c.num_frames for c in cases][-1]
    out = tmp_path / "bench"
    report = run_bench(target, cases, drafts, out, tree="5-3-2", temperatures=[0.0, 1.0],
                       max_new_tokens=12)
    cells = [json.loads(line) for line in (out / CELLS).read_text().splitlines()]
    assert len(cells) == len(cases) * 2 * 3  # lengths x videos x temperatures x methods
    greedy = [r for r in report["rows"] if r["temperature"] == 0]
    assert all(r["identical_to_ar"] == (2, 2) for r in greedy)  # lossless, per video
    assert {r["method"] for r in report["rows"]} == {"ar", "sparrow", "eagle"}
    # the draft's pass over the prompt is timed apart (part of its draft time)
    assert all(0 < c["draft_prefill_s"] <= c["draft_s"] for c in cells if c["method"] != "ar")
    ar = [r for r in report["rows"] if r["method"] == "ar"]
    assert all(r["tau"] == 1.0 and r["dsr"] == 1.0 for r in ar)
    # resume: a rerun runs nothing; a lost cell is run again, alone
    kept = cells[:-1]
    (out / CELLS).write_text("".join(json.dumps(c) + "\n" for c in kept))
    run_bench(target, cases, drafts, out, tree="5-3-2", temperatures=[0.0, 1.0], max_new_tokens=12)
    again = [json.loads(line) for line in (out / CELLS).read_text().splitlines()]
    assert len(again) == len(cells) and again[:-1] == kept
    assert {k: again[-1][k] for k in ("length", "index", "temperature", "method", "token_ids")} == \
        {k: cells[-1][k] for k in ("length", "index", "temperature", "method", "token_ids")}
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (out / name).stat().st_size > 0


def test_several_trees_run_every_draft_with_each(setup, tmp_path):
    target, prompts, drafts = setup
    cases = cases_from_prompts(target, prompts[:1], [100])
    report = run_bench(target, cases, drafts[:1], tmp_path / "b", tree="5-3-2,3-2-1",
                       temperatures=[0.0], max_new_tokens=8)
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"ar", "sparrow@5-3-2", "sparrow@3-2-1"}
    cells = {c["method"]: c for c in map(json.loads, (tmp_path / "b" / CELLS).read_text().splitlines())}
    assert cells["sparrow@5-3-2"]["tree"] != cells["sparrow@3-2-1"]["tree"]
    assert all(r["identical_to_ar"] == (1, 1) for r in rows.values())


@pytest.mark.parametrize("text", ["", "auto,auto", "auto,3-2"])
def test_bad_trees_are_refused(text):
    with pytest.raises(ConfigError, match="--tree"):
        parse_trees(text)


def test_dsr_is_per_token_decode_time_against_ar_on_the_same_video():
    def cell(method, index, decode_s, tokens, calls):
        return {"temperature": 0.0, "length": 500, "index": index, "method": method,
                "visual_tokens": 500, "tokens": tokens, "target_calls": calls, "prefill_s": 1.0,
                "decode_s": decode_s, "draft_s": 0.1, "verify_s": 0.2, "token_ids": [1] * tokens,
                "draft_cache_length": 0}

    cells = [cell("ar", 0, 4.0, 40, 39), cell("ar", 1, 2.0, 10, 9),
             cell("d", 0, 2.0, 40, 10), cell("d", 1, 0.5, 10, 4)]
    rows = {r["method"]: r for r in summarize(cells)}
    assert rows["d"]["dsr"] == pytest.approx(3.0)  # median of 2.0 and 4.0
    assert rows["d"]["tau"] == pytest.approx(48 / 14)  # the first token is the prefill's
    assert rows["ar"]["tau"] == 1.0
    assert rows["d"]["esr"] == pytest.approx((5 / 3 + 3 / 1.5) / 2)


@pytest.mark.parametrize("text,expected", [("0.5k,1.5k", [500, 1500]), ("25k", [25000]), ("700", [700])])
def test_lengths_parse(text, expected):
    assert parse_lengths(text) == expected


def test_bad_lengths_are_refused():
    with pytest.raises(ConfigError, match="not a length"):
        parse_lengths("0.5k,lots")


def test_anatomy_limit_standard_errors_and_the_ablation_table():
    """other = decode - draft - verify; limit = AR's seconds per token over the method's draft +
    verify seconds per token; standard errors over videos; the ablation table pivots drafts
    by the preset they were trained with."""
    from sparrow.bench import markdown

    def cell(method, index, decode_s, draft_s, verify_s, tokens, calls, preset=None, length=500):
        return {"temperature": 0.0, "length": length, "index": index, "method": method,
                "visual_tokens": length, "tokens": tokens, "target_calls": calls, "prefill_s": 1.0,
                "decode_s": decode_s, "draft_s": draft_s, "verify_s": verify_s,
                "token_ids": [1] * tokens, "draft_cache_length": 8, "draft_kv_bytes": 2**20,
                "preset": preset}

    cells = [cell("ar", 0, 4.0, 0.0, 3.6, 41, 40), cell("ar", 1, 4.0, 0.0, 3.6, 41, 40),
             cell("s", 0, 2.0, 0.5, 1.0, 41, 10, "sparrow"), cell("s", 1, 1.0, 0.2, 0.6, 41, 8, "sparrow"),
             cell("v", 0, 2.0, 0.5, 1.0, 41, 20, "ablation-vata"),
             cell("v", 1, 2.0, 0.5, 1.0, 41, 16, "ablation-vata")]
    rows = {r["method"]: r for r in summarize(cells)}
    s = rows["s"]
    assert s["other_ms"] == pytest.approx(1000 * (0.5 + 0.2) / 18)
    assert s["dsr"] == pytest.approx((2.0 + 4.0) / 2) and s["dsr_se"] == pytest.approx(1.0)
    assert s["dsr_limit"] == pytest.approx(((4 / 41) / (1.5 / 41) + (4 / 41) / (0.8 / 41)) / 2)
    assert s["achieved_of_limit"] == pytest.approx((0.75 + 0.8) / 2)
    assert s["tau_se"] == pytest.approx(abs(40 / 10 - 40 / 8) / 2)
    assert s["draft_kv_mb"] == pytest.approx(1.0)
    text = markdown(list(rows.values()), {})
    assert "| - - + | ablation-vata | 2.22 ± 0.25 |" in text  # 80 tokens / 36 calls; per video 2.0, 2.5
    assert "| + + + | sparrow | 4.44 ± 0.50 |" in text
    assert "| s | 4.44 / 3.00x |" in text  # the scaling table: tau / DSR by length
