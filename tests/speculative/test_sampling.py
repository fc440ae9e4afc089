"""At temperature > 0 speculative decoding samples exactly the target's distribution.

The acceptance rule is checked against the exact distribution of what one verification call
emits (a chi-square test with fixed seeds over a small vocabulary), at several temperatures and
with top-k and top-p. The target's distributions are built so that several siblings keep mass
after warping: only then does it matter how a later sibling is accepted once an earlier one was
rejected. The same test is run on two deliberately broken rules and must reject both: the bonus
token drawn without removing the rejected children, and the realistic slip of accepting a
later sibling with p(c) instead of p(c) over the mass its rejected elders left. End to end,
`generate`'s first two tokens match the target's exact joint: with the random draft's trees
(an M-RoPE and a 1-D RoPE family) and, in every family, with trees whose root has two
children that both hold the target's mass.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from sparrow.draft import init_draft
from sparrow.speculative.accept import Acceptance, accept_sampled
from sparrow.speculative.generate import generate
from sparrow.speculative.proposers import NoDraftProposer
from sparrow.speculative.sampling import SamplingParams
from sparrow.speculative.tree import Tree

V = 6


def chi_square_p_value(statistic: float, dof: int) -> float:
    """Upper tail of the chi-square distribution (Wilson-Hilferty normal approximation)."""
    if dof <= 0:
        return 1.0
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def goodness_of_fit(observed: Counter, expected: dict, trials: int) -> float:
    """Chi-square p-value of observed counts against expected probabilities, outcomes with an
    expected count below 5 pooled into one bin; 0 if an outcome the target gives probability
    0 was drawn."""
    possible = {k for k, p in expected.items() if p > 0}
    if not set(observed) <= possible:
        return 0.0
    bins: dict = {}
    for k in possible:
        key = k if trials * expected[k] >= 5 else "rare"
        p, n = bins.get(key, (0.0, 0))
        bins[key] = (p + expected[k], n + observed.get(k, 0))
    statistic = sum((n - trials * p) ** 2 / (trials * p) for p, n in bins.values())
    return chi_square_p_value(statistic, len(bins) - 1)


def _tree() -> Tree:
    # root -> [1, 3, 0]; node(1) -> [2, 4]; node(3) -> [5]; node(2) -> [1]
    return Tree(
        tokens=torch.tensor([0, 1, 3, 0, 2, 4, 5, 1]),
        parents=torch.tensor([-1, 0, 0, 0, 1, 1, 2, 4]),
        depths=torch.tensor([0, 1, 1, 1, 2, 2, 2, 3]),
        scores=torch.tensor([0.0, -0.5, -1.0, -2.0, -1.5, -2.5, -2.0, -2.5]),
    )


# The target's distribution at each node of _tree() before warping, over tokens 0..5. Where a
# node has several children, their tokens lead in draft-score order and one more token follows
# (the root: 1, 3, 0, then 5; node(1): 2, 4, then 0 and 1), so under every setting below each
# child keeps mass and so does a bonus candidate after all of them are rejected.
_PROBS = [
    [0.20, 0.30, 0.06, 0.25, 0.04, 0.15],  # root
    [0.15, 0.10, 0.35, 0.06, 0.30, 0.04],  # node(1)
    [0.10, 0.15, 0.05, 0.10, 0.15, 0.45],  # node(3)
    [0.30, 0.10, 0.25, 0.05, 0.20, 0.10],  # node(0)
    [0.05, 0.40, 0.20, 0.15, 0.10, 0.10],  # node(1, 2)
    [0.25, 0.05, 0.10, 0.30, 0.10, 0.20],  # node(1, 4)
    [0.10, 0.20, 0.30, 0.05, 0.25, 0.10],  # node(3, 5)
    [0.15, 0.25, 0.10, 0.20, 0.05, 0.25],  # node(1, 2, 1)
]


def _logits() -> torch.Tensor:
    return torch.tensor(_PROBS).log()  # (8, V)


def exact_emission_distribution(tree: Tree, logits: torch.Tensor, sampling: SamplingParams):
    """P(one call emits the token sequence s), enumerated over the tree: each emitted token is
    drawn from the target distribution at the node reached so far."""
    probs = sampling.probabilities(logits)
    children = tree.children()
    tokens = tree.tokens.tolist()
    out: dict[tuple, float] = {}

    def walk(node: int, prefix: tuple, mass: float):
        for token in range(V):
            p = mass * float(probs[node, token])
            follow = next((c for c in children[node] if tokens[c] == token), None)
            if follow is None:
                out[prefix + (token,)] = out.get(prefix + (token,), 0.0) + p
            else:
                walk(follow, prefix + (token,), p)

    walk(0, (), 1.0)
    return out


def _accept_without_renormalising(tree, logits, sampling, generator, remove_rejected: bool):
    """Wrong on purpose: child c is accepted with probability p(c) instead of p(c) / (mass left
    once its elder siblings were rejected); with `remove_rejected` False the rejected children
    are not removed before the bonus is drawn either."""
    tokens, children = tree.tokens.tolist(), tree.children()
    path = [0]
    while True:
        p = sampling.probabilities(logits[path[-1] : path[-1] + 1])[0]
        follow = None
        for child in children[path[-1]]:
            if torch.rand((), generator=generator) < p[tokens[child]]:
                follow = child
                break
            if remove_rejected:
                p[tokens[child]] = 0.0
        if follow is None:
            bonus = int(torch.multinomial(p / p.sum(), 1, generator=generator))
            return Acceptance(path=path, bonus=bonus)
        path.append(follow)


def broken_accept(tree, logits, sampling, generator):
    """The crude slip: rejected children are NOT removed before the bonus is drawn."""
    return _accept_without_renormalising(tree, logits, sampling, generator, remove_rejected=False)


def unrenormalised_accept(tree, logits, sampling, generator):
    """The realistic slip: accept.py's rule without the renormalisation over the mass left."""
    return _accept_without_renormalising(tree, logits, sampling, generator, remove_rejected=True)


SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=0.7, top_k=4),
    SamplingParams(temperature=1.3, top_p=0.8),
]
IDS = ["T1", "T0.6", "T0.7-topk4", "T1.3-topp0.8"]
TRIALS = 2000
P_VALUE_FLOOR = 1e-4  # a rule whose emissions fit worse than this is rejected


def _emission_counts(rule, sampling, trials: int, seed: int = 0):
    tree = _tree()
    logits = _logits()
    generator = torch.Generator().manual_seed(seed)
    counts: Counter = Counter()
    for _ in range(trials):
        decision = rule(tree, logits, sampling, generator)
        emitted = tuple(tree.tokens[decision.path[1:]].tolist()) + (decision.bonus,)
        counts[emitted] += 1
    return counts, exact_emission_distribution(tree, logits, sampling)


@pytest.mark.parametrize("sampling", SETTINGS, ids=IDS)
def test_several_siblings_keep_mass_after_warping(sampling):
    tree, probs = _tree(), sampling.probabilities(_logits())
    tokens, children = tree.tokens.tolist(), tree.children()
    for node in (0, 1):  # the nodes with more than one child
        kept = [float(probs[node, tokens[child]]) for child in children[node]]
        assert min(kept) > 0.1 and sum(kept) < 0.95, (node, kept)


@pytest.mark.parametrize("sampling", SETTINGS, ids=IDS)
def test_sampled_acceptance_matches_target_distribution(sampling):
    counts, exact = _emission_counts(accept_sampled, sampling, TRIALS)
    assert abs(sum(exact.values()) - 1) < 1e-6
    assert goodness_of_fit(counts, exact, TRIALS) > P_VALUE_FLOOR  # fixed seeds: deterministic


def test_broken_acceptance_rule_is_caught():
    counts, exact = _emission_counts(broken_accept, SETTINGS[0], TRIALS)
    assert goodness_of_fit(counts, exact, TRIALS) < 1e-6


@pytest.mark.parametrize("sampling", SETTINGS, ids=IDS)
def test_unrenormalised_sibling_acceptance_is_caught(sampling):
    counts, exact = _emission_counts(unrenormalised_accept, sampling, TRIALS)
    assert goodness_of_fit(counts, exact, TRIALS) < P_VALUE_FLOOR


def _first_two_exact(target, input_ids, sampling: SamplingParams):
    """The target's exact joint of its first two answer tokens {(x1, x2): P}, and its warped
    distribution (V,) of the second token after each possible first token x1."""
    first = sampling.probabilities(target.prefill(input_ids, capacity=4).logits[None])[0]
    exact, second_after = {}, {}
    for x1 in first.nonzero().flatten().tolist():
        target.prefill(input_ids, capacity=4)
        second = sampling.probabilities(target.forward(torch.tensor([x1])).logits)[0]
        second_after[x1] = second
        for x2 in second.nonzero().flatten().tolist():
            exact[x1, x2] = float(first[x1] * second[x2])
    return exact, second_after


def _first_two_counts(target, input_ids, trials: int, **options) -> Counter:
    """How often `generate` (T=1, top-k 3, seeds 0..trials-1) answers each first two tokens."""
    counts: Counter = Counter()
    for seed in range(trials):
        run = SamplingParams(temperature=1.0, top_k=3, seed=seed)
        result = generate(target, input_ids, max_new_tokens=2, sampling=run, **options)
        counts[tuple(result.token_ids)] += 1
    return counts


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])  # M-RoPE and 1-D RoPE
def test_speculative_sampling_end_to_end_matches_target(target):
    """First two tokens of sparrow generation at T=1, top-k 3, vs the target's exact joint."""
    input_ids = torch.tensor([target.tokenizer("a b c a b c a b").input_ids])
    exact, _ = _first_two_exact(target, input_ids, SamplingParams(temperature=1.0, top_k=3))
    draft = init_draft(target, "sparrow", seed=3)
    trials = 300
    counts = _first_two_counts(target, input_ids, trials, method="sparrow", draft=draft,
                               tree="10-3-3")
    assert goodness_of_fit(counts, exact, trials) > 1e-4  # fixed seeds: deterministic


class SiblingsProposer(NoDraftProposer):
    """Proposes fixed children below each root token, tried in the order given."""

    def __init__(self, children: dict[int, list[int]]):
        self.children = children

    def propose(self, root: int) -> Tree:
        kids = self.children[root]
        return Tree(
            tokens=torch.tensor([root, *kids]),
            parents=torch.tensor([-1] + [0] * len(kids)),
            depths=torch.tensor([0] + [1] * len(kids)),
            scores=-torch.arange(len(kids) + 1.0),  # the root, then the children in order
        )


def test_sampled_siblings_end_to_end_match_target(target):
    """Every family: the first two tokens at T=1, top-k 3, when the second is verified in a tree
    whose root has the target's two likeliest tokens as children (both hold mass; the likelier
    is tried first), vs the target's exact joint. A rule that accepts the second sibling with
    p instead of p / (1 - p(first sibling)) emits it too rarely here."""
    input_ids = torch.tensor([target.tokenizer("a b c a b c a b").input_ids])
    exact, second_after = _first_two_exact(target, input_ids, SamplingParams(1.0, top_k=3))
    children = {x1: second.topk(2).indices.tolist() for x1, second in second_after.items()}
    target.prefill(input_ids)
    prompt = target.snapshot()  # each run then prefills only the last prompt token
    trials = 400
    counts = _first_two_counts(target, input_ids, trials, proposer=SiblingsProposer(children),
                               tree="3-1-2", prefix=prompt)
    assert goodness_of_fit(counts, exact, trials) > P_VALUE_FLOOR  # fixed seeds: deterministic
