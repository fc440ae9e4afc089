"""`generate(logprobs=k)`: each emitted token's log-probability and the k most likely tokens at
its position are the target's own, exactly as transformers computes them (`output_logits`,
raw), for plain decoding and for speculative decoding, greedy and sampled, in every family.

Speculative rounds emit several tokens from one verify forward: the oracle proposer makes
every round accept a long path, so each token's logprob must come from the right tree node
(a off-by-one there gives the logprobs of a neighbouring position, which this catches).
"""

from __future__ import annotations

import pytest
import torch

from sparrow.draft import init_draft
from sparrow.errors import ConfigError
from sparrow.speculative.generate import generate
from sparrow.speculative.sampling import SamplingParams
from sparrow.speculative.tree import TreeSpec
from tests.helpers import reference_generate, reference_logits
from tests.speculative.test_lossless import PROMPTS, OracleProposer, _inputs, _room_for

TOP = 3
NEW = 16
ATOL = 2e-3  # our kernels against transformers' own attention, float32


def _assert_exact(result, logits: torch.Tensor) -> None:
    """result.logprobs against log_softmax(transformers' raw logits) at the same positions."""
    reference = torch.log_softmax(logits, dim=-1)
    assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids)
    for position, item in enumerate(result.logprobs):
        row = reference[position]
        assert item.token == result.token_ids[position]
        assert item.logprob == pytest.approx(float(row[item.token]), abs=ATOL)
        assert len(item.top) == TOP
        best = row.topk(TOP).values.tolist()
        assert [value for _, value in item.top] == pytest.approx(best, abs=ATOL)
        for token, value in item.top:  # ties may order ids differently; values must agree
            assert value == pytest.approx(float(row[token]), abs=ATOL)


def test_greedy_logprobs_are_the_targets_under_every_method(target, video_file):
    input_ids, video = _inputs(target, video_file, 4, PROMPTS[1])
    truth = reference_generate(target, input_ids, video, NEW, target.eos_token_ids)
    logits = reference_logits(target, input_ids, video, truth)
    plain = generate(target, input_ids, video, max_new_tokens=NEW, logprobs=TOP)
    assert plain.token_ids == truth
    _assert_exact(plain, logits)
    for mode in ("sparrow", "eagle"):
        proposer = OracleProposer(init_draft(target, mode), target, TreeSpec.parse("30-4-8"), truth, 4)
        result = generate(target, input_ids, video, method=mode, proposer=proposer,
                          tree=_room_for("30-4-8", 4), max_new_tokens=NEW, logprobs=TOP)
        assert result.token_ids == truth and max(result.accepted_lengths) == 5
        _assert_exact(result, logits)


def test_sampled_logprobs_are_the_targets_raw_ones(target):
    """At T > 0 the logprobs are still the raw distribution's (before temperature, top-k,
    top-p), whatever the method, and the streamed ones are the final ones, in order."""
    input_ids = torch.tensor([target.tokenizer(PROMPTS[0]).input_ids])
    sampling = SamplingParams(temperature=0.7, top_k=20, seed=3)
    draft = init_draft(target, "sparrow")
    for method in ("ar", "sparrow"):
        streamed = []
        result = generate(target, input_ids, method=method, draft=draft, tree="10-3-4",
                          max_new_tokens=NEW, sampling=sampling, logprobs=TOP,
                          on_tokens=lambda tokens, logprobs, streamed=streamed: streamed.extend(logprobs))
        assert streamed == result.logprobs
        _assert_exact(result, reference_logits(target, input_ids, None, result.token_ids))


def test_logprobs_off_by_default_and_bounded(target):
    input_ids = torch.tensor([target.tokenizer("Hi").input_ids])
    assert generate(target, input_ids, max_new_tokens=2).logprobs is None
    none = generate(target, input_ids, max_new_tokens=2, logprobs=0)
    assert len(none.logprobs) == 2 and all(item.top == [] for item in none.logprobs)
    with pytest.raises(ConfigError, match="logprobs=21"):
        generate(target, input_ids, max_new_tokens=2, logprobs=21)
