"""Acceptance: which path of a verified tree the target agrees with.

Terminology (used across sparrow):
  root        the last emitted token; the target has not yet run on it. Every verified
              tree starts with it, so each target call computes at least one new token.
  accepted    draft tokens the target agrees with, along one root-to-node path.
  bonus       the token the target itself produces after the last accepted node (from its
              logits at that node); it is emitted on every call and becomes the next root.
  tau         mean accepted length = tokens emitted / target verification calls, bonus
              included (plain decoding has tau = 1; the prefill call is not counted).
  DSR / ESR   decode-phase / end-to-end speedup over plain decoding of the same target.

Greedy: follow children whose token equals the target's argmax at their parent.

Sampling (T > 0): recursive rejection over siblings. At a node with target distribution p,
try its children in draft-score order; child c is a point-mass proposal, accepted with
probability p(c) / (remaining mass); on rejection p(c) is removed from p. If every child is
rejected, the bonus is sampled from what remains. Each emitted token is therefore distributed
exactly as p (the draft only decides how many of them one call yields).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparrow.speculative.sampling import SamplingParams
from sparrow.speculative.tree import Tree


@dataclass
class Acceptance:
    path: list[int]  # tree node indices from the root (index 0) to the last accepted node
    bonus: int  # token the target produced after the path

    @property
    def accepted_tokens(self) -> int:
        return len(self.path) - 1


def accept_greedy(tree: Tree, logits: torch.Tensor) -> Acceptance:
    """logits: (n, V) target logits at each tree node."""
    argmax = logits.argmax(dim=-1).tolist()  # (n,)
    tokens = tree.tokens.tolist()
    children = tree.children()
    path = [0]
    while True:
        want = argmax[path[-1]]
        follow = next((c for c in children[path[-1]] if tokens[c] == want), None)
        if follow is None:
            return Acceptance(path=path, bonus=want)
        path.append(follow)


def accept_sampled(
    tree: Tree, logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator
) -> Acceptance:
    """Lossless stochastic acceptance over the tree (see module docstring)."""
    tokens = tree.tokens.tolist()
    children = tree.children()
    path = [0]
    while True:
        node = path[-1]
        p = sampling.probabilities(logits[node : node + 1])[0]  # (V,)
        follow = None
        for child in children[node]:
            token = tokens[child]
            mass = p.sum()
            u = torch.rand((), generator=generator, device=generator.device)
            if mass > 0 and u * mass < p[token]:
                follow = child
                break
            p[token] = 0.0  # rejected: the residual distribution excludes it
        if follow is None:
            bonus = int(torch.multinomial(p / p.sum(), 1, generator=generator))
            return Acceptance(path=path, bonus=bonus)
        path.append(follow)
