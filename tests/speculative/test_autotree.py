"""`--tree auto`: expected tokens of a tree from an acceptance profile, costs measured here,
the fastest tree chosen, and decoding with it as exact as with any other."""

from __future__ import annotations

import pytest

from sparrow.api import prepare_video
from sparrow.draft import init_draft
from sparrow.speculative.autotree import (
    FALLBACK,
    choose_tree,
    costs_for,
    expected_tokens,
    round_seconds,
)
from sparrow.speculative.generate import generate
from sparrow.speculative.tree import TreeSpec
from sparrow.video.prompt import build_video_prompt
from tests.helpers import reference_generate

SURE = [[1.0] + [0.0] * 9] * 8  # the draft's first choice is always right
HALF = [[0.5, 0.3] + [0.0] * 8] * 8


def test_expected_tokens_of_static_trees():
    assert expected_tokens(SURE, TreeSpec(5, 4, 1)) == 5.0  # 4 certain tokens + the bonus
    assert expected_tokens(SURE, TreeSpec(3, 4, 1)) == 3.0  # only 2 nodes fit
    # a chain of 2 at 0.5 a level: 1 + 0.5 + 0.25
    assert expected_tokens(HALF, TreeSpec(3, 2, 1)) == pytest.approx(1.75)
    # width adds the second choice (0.3) before the 0.25 grandchild
    assert expected_tokens(HALF, TreeSpec(3, 2, 2)) == pytest.approx(1.8)


def test_the_fastest_tree_follows_the_costs():
    costs = {"verify_s": {1: 1.0, 2: 1.1, 4: 1.2, 8: 1.5, 16: 2.5, 32: 5.0, 48: 8.0},
             "draft_level_s": {1: 0.01, 10: 0.02}}
    spec, speedup = choose_tree(SURE, costs)
    assert spec.top_k == 1 and spec.total_tokens == spec.depth + 1  # a sure draft: a chain
    assert speedup == pytest.approx(expected_tokens(SURE, spec) / round_seconds(spec, costs))
    assert spec.depth == 8  # cheap verifies: as deep as the profile goes
    expensive = {**costs, "verify_s": {1: 1.0, 2: 2.0, 48: 48.0}}  # verify grows with q
    assert choose_tree(HALF, expensive)[0].total_tokens == 2
    assert choose_tree(None, costs) == (FALLBACK, 1.0)  # an untrained draft: the cheapest bet


def test_auto_tree_is_lossless_and_measured_once(target, video_file, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARROW_HOME", str(tmp_path))
    video = prepare_video(target, video_file(4), num_frames=4)
    ids = build_video_prompt(target.tokenizer, target.config, video, "What happens?")
    reference = reference_generate(target, ids, video, 16, target.eos_token_ids)
    draft = init_draft(target, "sparrow", seed=2)
    draft.config.acceptance = HALF
    result = generate(target, ids, video, method="sparrow", draft=draft, tree="auto", max_new_tokens=16)
    assert result.token_ids == reference
    assert TreeSpec.parse(result.tree)  # a real tree was chosen and recorded
    files = list((tmp_path / "costs").glob("*.json"))
    assert len(files) == 1
    before = files[0].read_text()
    generate(target, ids, video, method="sparrow", draft=draft, tree="auto", max_new_tokens=4)
    assert files[0].read_text() == before  # the same length bucket: measured once
    costs = costs_for(target, draft, ids.shape[1])
    assert set(costs["verify_s"]) >= {1, 2, 16} and all(v > 0 for v in costs["verify_s"].values())


def test_an_eagle_mode_draft_level_is_measured_over_a_cache_of_the_requests_length(
        target, tmp_path, monkeypatch):
    """An eagle-mode draft attends to every position: its level costs grow with the video, so
    they are measured over a draft cache as long as the target's (sparrow mode: a short one)."""
    from sparrow.speculative import autotree

    monkeypatch.setenv("SPARROW_HOME", str(tmp_path))
    draft = init_draft(target, "eagle", seed=0)
    lengths = []
    real = autotree._random_cache
    monkeypatch.setattr(autotree, "_random_cache", lambda layers, length, *rest: (
        lengths.append((layers, length)) or real(layers, length, *rest)))
    costs_for(target, draft, 1000, "eagle")
    costs_for(target, draft, 1000, "sparrow")
    assert lengths == [(target.num_layers, 1024), (1, 1024), (target.num_layers, 1024), (1, 256)]
    assert len(list((tmp_path / "costs").glob("*.json"))) == 2  # one cache file per mode


def test_costs_are_measured_anew_for_other_kernels(target, tmp_path, monkeypatch):
    """Measured costs are stored per kernel build and thresholds (`native.fingerprint`): a step
    that runs other kernels than when they were measured is measured again, not read back."""
    from sparrow.runtime import native
    from sparrow.speculative import autotree

    monkeypatch.setenv("SPARROW_HOME", str(tmp_path))
    draft = init_draft(target, "sparrow", seed=0)
    first = autotree._cache_file(target, draft, "sparrow")
    monkeypatch.setattr(native, "fingerprint", lambda: "another-build")
    assert autotree._cache_file(target, draft, "sparrow") != first
