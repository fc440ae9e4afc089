"""Greedy speculative output equals transformers' own `generate`, token for token.

Every family, text-only and with videos of different frame counts, trees from a chain of one
draft token to wide ones, random-init drafts in both attention modes, with and without an EOS
inside the budget. Random drafts are mostly rejected, so a second set of tests drives the same
loop with an oracle proposer that puts the target's true continuation deep in wide trees, as
a non-first sibling: long accepted paths, an EOS inside one, and non-contiguous cache
compaction get exercised in every family and both draft modes.

The reference answers must be varied (MIN_DISTINCT): an answer that repeats one token is the
same whatever position or cache entry the loop gets wrong, and would hide those bugs.
"""

from __future__ import annotations

import pytest
import torch

from sparrow.api import prepare_video
from sparrow.draft import init_draft
from sparrow.errors import ConfigError
from sparrow.speculative.generate import generate
from sparrow.speculative.proposers import DraftProposer
from sparrow.speculative.tree import Tree, TreeSpec
from sparrow.video.prompt import build_video_prompt
from tests.helpers import reference_generate

PROMPTS = ["What happens in the video?", "Describe the colours, then count the objects."]
TREES = ["2-1-1", "5-4-1", "30-4-8", "60-7-10"]
MAX_NEW = 24
MIN_DISTINCT = 12  # distinct tokens a reference answer of MAX_NEW tokens must hold


def _inputs(target, video_file, frames: int, prompt: str):
    video = prepare_video(target, video_file(frames), num_frames=frames) if frames else None
    return build_video_prompt(target.tokenizer, target.config, video, prompt), video


@pytest.mark.parametrize("frames", [0, 4, 8])
def test_greedy_speculative_equals_generate(target, video_file, frames):
    for prompt in PROMPTS:
        input_ids, video = _inputs(target, video_file, frames, prompt)
        reference = reference_generate(target, input_ids, video, MAX_NEW, target.eos_token_ids)
        assert len(reference) == MAX_NEW
        assert len(set(reference)) >= MIN_DISTINCT, target.tokenizer.decode(reference)
        for method in ("ar", "sparrow", "eagle"):
            draft = None if method == "ar" else init_draft(target, method, seed=frames)
            for tree in TREES if method != "ar" else TREES[:1]:
                result = generate(target, input_ids, video, method=method, draft=draft,
                                  tree=tree, max_new_tokens=MAX_NEW)
                assert result.token_ids == reference, (method, tree, prompt)
                assert sum(result.accepted_lengths) == len(reference) - 1


def test_eos_inside_budget_stops_like_generate(target, video_file):
    input_ids, video = _inputs(target, video_file, 4, PROMPTS[0])
    free_run = reference_generate(target, input_ids, video, MAX_NEW, target.eos_token_ids)
    # Declare a token the target produces mid-answer as EOS: both must stop right after it.
    eos = [free_run[len(free_run) // 2]]
    reference = reference_generate(target, input_ids, video, MAX_NEW, eos)
    assert len(reference) < MAX_NEW and reference[-1] == eos[0]
    for method in ("ar", "sparrow", "eagle"):
        draft = None if method == "ar" else init_draft(target, method)
        result = generate(target, input_ids, video, method=method, draft=draft, tree="30-4-8",
                          max_new_tokens=MAX_NEW, eos_token_ids=eos)
        assert result.token_ids == reference
        assert result.finish_reason == "eos"


class OracleProposer(DraftProposer):
    """Drafts with the real draft, then grafts the target's true continuation into the tree,
    as the last child wherever the draft missed it (so its cache slots are not the first)."""

    def __init__(self, draft, target, spec, truth: list[int], depth: int):
        super().__init__(draft, target, spec)
        self.truth, self.depth, self.emitted = truth, depth, 1

    def start(self, prefill, first_token, capacity):
        super().start(prefill, first_token, capacity)
        self.emitted = 1  # tokens of `truth` emitted so far

    def commit(self, features, next_tokens):
        self.emitted += int(next_tokens.shape[0])
        super().commit(features, next_tokens)

    def propose(self, root: int) -> Tree:
        tree = super().propose(root)
        chain = self.truth[self.emitted : self.emitted + self.depth]
        tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
        depths, scores = tree.depths.tolist(), tree.scores.tolist()
        parent = 0
        for token in chain:
            existing = [i for i, p in enumerate(parents) if p == parent and tokens[i] == token]
            if existing:  # the draft found this one itself: graft below it
                parent = existing[0]
                continue
            tokens.append(token)
            parents.append(parent)
            depths.append(depths[parent] + 1)
            scores.append(-1e9)  # tried last among siblings
            parent = len(tokens) - 1
        order = sorted(range(len(tokens)), key=lambda i: (depths[i], i))
        where = {old: new for new, old in enumerate(order)}
        return Tree(
            tokens=torch.tensor([tokens[i] for i in order]),
            parents=torch.tensor([-1 if parents[i] < 0 else where[parents[i]] for i in order]),
            depths=torch.tensor([depths[i] for i in order]),
            scores=torch.tensor([scores[i] for i in order]),
        )


@pytest.mark.parametrize("mode", ["sparrow", "eagle"])
def test_long_accepted_paths_stay_lossless(target, video_file, mode):
    input_ids, video = _inputs(target, video_file, 8, PROMPTS[1])
    reference = reference_generate(target, input_ids, video, 40, target.eos_token_ids)
    assert len(reference) == 40 and len(set(reference[:MAX_NEW])) >= MIN_DISTINCT
    for depth, spec in ((1, "2-1-1"), (4, "30-4-8"), (6, "60-7-10")):
        proposer = OracleProposer(init_draft(target, mode), target, TreeSpec.parse(spec),
                                  reference, depth)
        # Sized for the oracle's trees: the drafted ones plus up to `depth` grafted nodes.
        result = generate(target, input_ids, video, method=mode, proposer=proposer,
                          tree=_room_for(spec, depth), max_new_tokens=40)
        assert result.token_ids == reference
        # The oracle chain is accepted whole every round: depth + 1 tokens per call.
        assert result.target_calls == -(-(len(reference) - 1) // (depth + 1))


def _room_for(spec: str, grafted: int) -> TreeSpec:
    """A spec whose total_tokens covers `spec`'s trees with `grafted` nodes added (generate
    sizes the caches from it; the oracle drafts with `spec` itself)."""
    drafted = TreeSpec.parse(spec)
    return TreeSpec(drafted.total_tokens + grafted, drafted.depth + grafted, drafted.top_k)


@pytest.mark.parametrize("mode", ["sparrow", "eagle"])
def test_eos_inside_an_accepted_path_stops_like_generate(target, video_file, mode):
    input_ids, video = _inputs(target, video_file, 8, PROMPTS[1])
    free_run = reference_generate(target, input_ids, video, 40, target.eos_token_ids)
    depth = 4
    # Answer token i (i >= 1) comes from call (i - 1) // (depth + 1), at slot
    # (i - 1) % (depth + 1) of what it emits: slots below `depth` are the oracle chain's
    # accepted tokens, slot `depth` the bonus. Declare as EOS a token that first appears after
    # a whole call, with accepted chain tokens after it in its own path.
    stop = next(i for i in range(depth + 2, len(free_run))
                if (i - 1) % (depth + 1) < depth - 1 and free_run[i] not in free_run[:i])
    eos = [free_run[stop]]
    reference = reference_generate(target, input_ids, video, 40, eos)
    assert reference == free_run[: stop + 1]
    proposer = OracleProposer(init_draft(target, mode), target, TreeSpec.parse("30-4-8"),
                              free_run, depth)
    result = generate(target, input_ids, video, method=mode, proposer=proposer,
                      tree=_room_for("30-4-8", depth), max_new_tokens=40, eos_token_ids=eos)
    assert result.token_ids == reference
    assert result.finish_reason == "eos"
    # The last call accepted past the EOS; what it emits stops right after it.
    assert result.accepted_lengths[-1] == (stop - 1) % (depth + 1) + 1 < depth


def test_a_proposer_tree_larger_than_the_cache_room_is_a_clear_error(target):
    input_ids = torch.tensor([target.tokenizer("a tree too large").input_ids])
    reference = reference_generate(target, input_ids, None, 8, target.eos_token_ids)
    depth = 6  # a chain of one drafted token, then at least 5 grafted: trees of 7 or more

    def run(tree):
        proposer = OracleProposer(init_draft(target, "sparrow"), target, TreeSpec.parse("2-1-1"),
                                  reference, depth)
        return generate(target, input_ids, method="sparrow", proposer=proposer, tree=tree,
                        max_new_tokens=2)

    with pytest.raises(ConfigError, match=r"tree of \d+ tokens.*--tree 2-1-1"):
        run("2-1-1")
    assert run(_room_for("2-1-1", depth)).token_ids == reference[:2]


def test_draft_cache_holds_only_text_in_sparrow_mode(target, video_file):
    results = {}
    for frames in (4, 8):
        input_ids, video = _inputs(target, video_file, frames, PROMPTS[0])
        text_tokens = int((input_ids[0] != target.video_token_id()).sum())
        for mode in ("sparrow", "eagle"):
            result = generate(target, input_ids, video, method=mode,
                              draft=init_draft(target, mode), max_new_tokens=16)
            committed = sum(result.accepted_lengths[:-1])  # the last round is never fed back
            prompt_pairs = text_tokens if mode == "sparrow" else input_ids.shape[1]
            assert result.draft_cache_length == prompt_pairs + committed
            results[frames, mode] = result
    assert results[4, "sparrow"].num_visual_tokens < results[8, "sparrow"].num_visual_tokens


def test_streaming_callback_sees_every_token_in_order_and_can_stop(target):
    input_ids = torch.tensor([target.tokenizer("stream me a story").input_ids])
    draft = init_draft(target, "sparrow")
    chunks: list[list[int]] = []
    result = generate(target, input_ids, method="sparrow", draft=draft, max_new_tokens=20,
                      on_tokens=lambda tokens, _: chunks.append(list(tokens)))
    assert [t for chunk in chunks for t in chunk] == result.token_ids
    assert len(chunks) == result.target_calls + 1  # the prefill's token, then one per call
    stopped = generate(target, input_ids, method="sparrow", draft=draft, max_new_tokens=20,
                       on_tokens=lambda tokens, _: True)
    assert stopped.finish_reason == "stopped" and stopped.token_ids == result.token_ids[:1]


# Every draft configuration the trainer can produce (sparrow.training.config): visual positions
# fed as a target layer's states (`mid`: IVSB without VATA; `embed`: MSD-like), and a reduced
# draft vocabulary (tokens outside it are never proposed). Random weights; the loop must stay
# exact whatever the draft sees or predicts over.
DRAFT_CONFIGS = [
    ("eagle", {"visual": "mid"}),
    ("eagle", {"visual": "embed"}),
    ("eagle", {"visual": "last"}),
    ("sparrow", {"visual": "mid", "draft_vocab_size": 40}),
    ("eagle", {"visual": "embed", "draft_vocab_size": 40}),
]


@pytest.mark.parametrize("mode,config", DRAFT_CONFIGS, ids=lambda c: str(c))
def test_every_draft_configuration_is_lossless(target, video_file, mode, config):
    input_ids, video = _inputs(target, video_file, 8, PROMPTS[1])
    reference = reference_generate(target, input_ids, video, MAX_NEW, target.eos_token_ids)
    draft = init_draft(target, mode, seed=3, **config)
    if config.get("draft_vocab_size"):  # a vocabulary holding part of the answer's tokens
        vocab = sorted(set(reference[::2]) | set(range(config["draft_vocab_size"])))
        draft.vocab = torch.tensor(vocab[: config["draft_vocab_size"]])
    for tree in ("2-1-1", "30-4-8"):
        result = generate(target, input_ids, video, method=mode, draft=draft, tree=tree,
                          max_new_tokens=MAX_NEW)
        assert result.token_ids == reference, (mode, config, tree)
    proposer = OracleProposer(draft, target, TreeSpec.parse("30-4-8"), reference, 4)
    result = generate(target, input_ids, video, method=mode, proposer=proposer,
                      tree=_room_for("30-4-8", 4), max_new_tokens=MAX_NEW)
    assert result.token_ids == reference
    if config.get("draft_vocab_size"):  # proposed tokens all come from the vocabulary
        proposed = DraftProposer(draft, target, TreeSpec.parse("30-4-8"))
        target.prefill(input_ids, video, capacity=64, layers=proposed.prefill_layers)
        proposed.start(target.prompt, reference[0], capacity=32)
        assert set(proposed.propose(reference[0]).tokens[1:].tolist()) <= set(draft.vocab.tolist())
