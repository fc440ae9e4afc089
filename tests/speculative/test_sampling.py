"""At temperature > 0 speculative decoding samples exactly the target's distribution.

The acceptance rule is checked against the exact distribution of what one verification call
emits (a chi-square test with fixed seeds over a small vocabulary), with temperature, top-k and
top-p. The same test is run on a deliberately broken rule (the bonus token is drawn without
removing the rejected children) and must reject it: the test can fail.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from sparrow.draft import init_draft
from sparrow.speculative.accept import accept_sampled
from sparrow.speculative.generate import generate
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


def broken_accept(tree, logits, sampling, generator):
    """Wrong on purpose: rejected children are NOT removed before the bonus is drawn."""
    tokens, children = tree.tokens.tolist(), tree.children()
    path = [0]
    while True:
        p = sampling.probabilities(logits[path[-1] : path[-1] + 1])[0]
        follow = None
        for child in children[path[-1]]:
            if torch.rand((), generator=generator) < p[tokens[child]]:
                follow = child
                break
        if follow is None:
            bonus = int(torch.multinomial(p, 1, generator=generator))
            return type("A", (), {"path": path, "bonus": bonus})()
        path.append(follow)


SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=4),
    SamplingParams(temperature=1.3, top_p=0.8),
]


def _emission_counts(rule, sampling, trials: int, seed: int = 0):
    tree = _tree()
    logits = torch.randn(len(tree), V, generator=torch.Generator().manual_seed(7)) * 1.5
    generator = torch.Generator().manual_seed(seed)
    counts: Counter = Counter()
    for _ in range(trials):
        decision = rule(tree, logits, sampling, generator)
        emitted = tuple(tree.tokens[decision.path[1:]].tolist()) + (decision.bonus,)
        counts[emitted] += 1
    return counts, exact_emission_distribution(tree, logits, sampling)


@pytest.mark.parametrize("sampling", SETTINGS, ids=["T1", "T0.7-topk4", "T1.3-topp0.8"])
def test_sampled_acceptance_matches_target_distribution(sampling):
    trials = 6000
    counts, exact = _emission_counts(accept_sampled, sampling, trials)
    assert abs(sum(exact.values()) - 1) < 1e-6
    assert goodness_of_fit(counts, exact, trials) > 1e-4  # fixed seeds: deterministic


def test_broken_acceptance_rule_is_caught():
    trials = 6000
    counts, exact = _emission_counts(broken_accept, SETTINGS[0], trials)
    assert goodness_of_fit(counts, exact, trials) < 1e-6


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])  # M-RoPE and 1-D RoPE
def test_speculative_sampling_end_to_end_matches_target(target):
    """First two tokens of sparrow generation at T=1, top-k 3, vs the target's exact joint."""
    sampling = SamplingParams(temperature=1.0, top_k=3)
    input_ids = torch.tensor([target.tokenizer("a b c a b c a b").input_ids])
    first = sampling.probabilities(target.prefill(input_ids, capacity=4).logits[None])[0]
    exact = {}
    for x1 in first.nonzero().flatten().tolist():
        target.prefill(input_ids, capacity=4)
        second = sampling.probabilities(target.forward(torch.tensor([x1])).logits)[0]
        for x2 in second.nonzero().flatten().tolist():
            exact[x1, x2] = float(first[x1] * second[x2])
    draft = init_draft(target, "sparrow", seed=3)
    counts: Counter = Counter()
    trials = 300
    for seed in range(trials):
        run = SamplingParams(temperature=1.0, top_k=3, seed=seed)
        result = generate(target, input_ids, method="sparrow", draft=draft, tree="10-3-3",
                          max_new_tokens=2, sampling=run)
        counts[tuple(result.token_ids)] += 1
    assert goodness_of_fit(counts, exact, trials) > 1e-4  # fixed seeds: deterministic
