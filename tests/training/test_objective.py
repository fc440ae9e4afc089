"""The training objective against the decoding loop: what the draft is trained on is what it
sees when it drafts, in every configuration, and the MTP / chain bookkeeping is exact."""

from __future__ import annotations

import pytest
import torch

from sparrow.api import prepare_video
from sparrow.draft import init_draft
from sparrow.speculative.proposers import DraftProposer
from sparrow.speculative.tree import TreeSpec
from sparrow.training.config import TrainConfig
from sparrow.training.data import Sample
from sparrow.training.datagen import _sample_states
from sparrow.training.objective import Batch, Frozen, chain_acceptance, losses, make_batch
from sparrow.video.prompt import build_video_prompt

# (what visual positions carry in training, the inference mode that sees the same)
MATCHING = [("none", "sparrow"), ("last", "eagle"), ("mid", "eagle"), ("embed", "eagle")]


def _sample(target, video_file):
    video = prepare_video(target, video_file(8), num_frames=8)
    ids = build_video_prompt(target.tokenizer, target.config, video, "What happens?")[0]
    # any answer will do: the states come from the target reading it (teacher forcing)
    answer = target.tokenizer.encode("A red square moves right.", add_special_tokens=False)
    mid = target.num_layers // 2
    tensors = _sample_states(target, ids, answer, video, mid)
    tensors["input_ids"] = tensors["input_ids"].long()
    return Sample(**tensors, key="t/0"), ids, answer, video


@pytest.mark.parametrize("visual,mode", MATCHING)
def test_training_sequence_is_what_decoding_feeds(target, video_file, visual, mode):
    """The draft's outputs over a training sequence equal those of the decoding loop's draft
    cache after the prompt and after committing answer tokens."""
    sample, ids, answer, video = _sample(target, video_file)
    draft = init_draft(target, mode, seed=1, visual=visual)
    batch = make_batch([sample], visual)
    trained = draft(target.embed(batch.tokens), batch.features.to(target.dtype), batch.positions,
                    direct=batch.direct, direct_mask=batch.direct_mask)[0]  # (n, d)
    proposer = DraftProposer(draft, target, TreeSpec.parse("4-2-2"))
    prompt = target.prefill(ids, video, capacity=64, layers=proposer.prefill_layers)
    proposer.start(prompt, answer[0], capacity=32)
    fed = sample.visual_mask[: len(ids)].logical_not().sum() if visual == "none" else len(ids)
    pair = int(fed) - 1  # the pair (h_{L-1}, x_L = answer[0]) is the prompt's last one
    torch.testing.assert_close(proposer.last_output, trained[pair], atol=1e-4, rtol=1e-4)
    L = len(ids)
    proposer.commit(sample.last[L:L + 3].float(), sample.input_ids[L + 1:L + 4])
    torch.testing.assert_close(proposer.last_output, trained[pair + 3], atol=1e-4, rtol=1e-4)


def _oracle(batch):
    """A 'draft' that always outputs the target's true next state: every chain accepts."""
    def draft(embeds, features, positions, direct=None, direct_mask=None):
        return batch.labels.clone()
    return draft


def _toy_batch(scored: list[bool]) -> Batch:
    n, d = len(scored), 4
    labels = torch.eye(d)[torch.arange(n) % d][None]  # state i -> token i % d
    return Batch(tokens=torch.zeros(1, n, dtype=torch.long), features=labels.clone(),
                 labels=labels, positions=torch.arange(n)[None],
                 scored=torch.tensor([scored]), chained=torch.arange(n)[None] > 0,
                 direct=None, direct_mask=None)


def test_chain_acceptance_counts_consecutive_hits_within_the_answer():
    batch = _toy_batch([False, True, True, True, True, False])
    frozen = Frozen(embedding=torch.eye(4), head=torch.eye(4), full_head=torch.eye(4), vocab=None)
    accepted, chains = chain_acceptance(_oracle(batch), batch, frozen, depth=3)
    # chains start at the 4 scored pairs and run to depth 3 or the end of the answer: 3 3 2 1
    assert (accepted, chains) == (9.0, 4)
    wrong = lambda *a, **k: batch.labels.roll(1, dims=-1)  # noqa: E731 - never the target's token
    assert chain_acceptance(wrong, batch, frozen, depth=3) == (0.0, 4)


def test_mtp_feeds_each_pass_the_previous_outputs_shifted():
    batch = _toy_batch([True] * 5)
    batch.chained[0, 2] = False  # e.g. a visual state before pair 2: it keeps the target's
    seen = []

    def draft(embeds, features, positions, direct=None, direct_mask=None):
        seen.append(features.clone())
        return features + 1.0

    frozen = Frozen(embedding=torch.eye(4), head=torch.eye(4), full_head=torch.eye(4), vocab=None)
    config = TrainConfig(mtp=3, noise=0.0)
    losses(draft, batch, frozen, config, count=5.0)
    assert len(seen) == 3
    torch.testing.assert_close(seen[0], batch.features)
    for j in (1, 2):
        expected = batch.features.clone()
        expected[0, 1:] = seen[j - 1][0, :-1] + 1.0
        expected[0, 2] = batch.features[0, 2]  # not chained: the target's state
        expected[0, 0] = batch.features[0, 0]
        torch.testing.assert_close(seen[j], expected)


def test_rank_counts_place_the_targets_token_by_depth():
    from sparrow.training.objective import rank_counts

    batch = _toy_batch([False, True, True, True, True, False])
    frozen = Frozen(embedding=torch.eye(4), head=torch.eye(4), full_head=torch.eye(4), vocab=None)
    counts = rank_counts(_oracle(batch), batch, frozen, depth=3, ranks=2)
    # chains inside the 4 scored pairs: 4 at depth 1, 3 at depth 2, 2 at depth 3; all rank 0
    assert counts.tolist() == [[4, 0, 0], [3, 0, 0], [2, 0, 0]]
    second = lambda *a, **k: batch.labels * 0.5 + batch.labels.roll(1, dims=-1)  # noqa: E731
    assert rank_counts(second, batch, frozen, depth=1, ranks=2).tolist() == [[0, 4, 0]]
    # a reduced vocabulary without the target's token: outside (the last column)
    small = Frozen(embedding=torch.eye(4), head=torch.eye(4)[:1], full_head=torch.eye(4),
                   vocab=torch.tensor([3]))
    assert rank_counts(_oracle(batch), batch, small, depth=1, ranks=2).tolist() == [[1, 0, 3]]
