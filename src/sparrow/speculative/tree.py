"""EAGLE-2 dynamic draft trees.

A tree is written total_tokens-depth-top_k (30-4-8 by default):
  top_k         children proposed per expanded node, and beams expanded per level;
  depth         draft levels below the root (the longest path a round can accept is depth
                draft tokens plus the bonus token);
  total_tokens  tokens verified per target call, root included.
Drafting: level 1 is the root's top_k children; each further level expands the top_k nodes of
the previous level (by cumulative draft log-probability) into top_k children each. The tree
sent to the target keeps the total_tokens - 1 best nodes overall (a node's score never exceeds
its parent's, so the best nodes form a tree) plus the root.

Node order everywhere: index 0 is the root; nodes are sorted by depth, so parents come first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from sparrow.errors import ConfigError


@dataclass(frozen=True)
class TreeSpec:
    total_tokens: int = 30
    depth: int = 4
    top_k: int = 8

    @classmethod
    def parse(cls, text: str) -> TreeSpec:
        """Parse 'total-depth-topk', e.g. '30-4-8'; a chain of n tokens is '(n+1)-n-1'."""
        match = re.fullmatch(r"\s*(\d+)-(\d+)-(\d+)\s*", str(text))
        if not match:
            raise ConfigError(
                f"--tree {text!r}: expected total_tokens-depth-top_k, e.g. 30-4-8 (a chain of "
                "4 draft tokens is 5-4-1)"
            )
        spec = cls(*(int(g) for g in match.groups()))
        spec.validate(text)
        return spec

    def validate(self, text: str | None = None) -> None:
        name = text or str(self)
        if self.depth < 1 or self.top_k < 1 or self.total_tokens < 2:
            raise ConfigError(f"--tree {name}: need total_tokens >= 2, depth >= 1, top_k >= 1")
        if self.total_tokens - 1 > self.max_nodes:
            raise ConfigError(
                f"--tree {name}: at most {self.max_nodes} draft nodes fit depth {self.depth} and "
                f"top_k {self.top_k}; lower total_tokens to <= {self.max_nodes + 1}"
            )

    @property
    def max_nodes(self) -> int:
        """Candidate nodes drafting produces: top_k + (depth - 1) * top_k^2."""
        return self.top_k + (self.depth - 1) * self.top_k * self.top_k

    def __str__(self) -> str:
        return f"{self.total_tokens}-{self.depth}-{self.top_k}"


DEFAULT_TREE = TreeSpec()  # 30-4-8, the paper's LLaVA-OneVision setting
AUTO = "auto"  # `--tree auto`: chosen per request by `sparrow.speculative.autotree`


def parse_tree(text: str) -> TreeSpec | str:
    """A `--tree` value: a TreeSpec, or AUTO."""
    return AUTO if str(text).strip() == AUTO else TreeSpec.parse(text)


@dataclass
class Tree:
    tokens: torch.Tensor  # (n,) int64, tokens[0] is the root (already emitted)
    parents: torch.Tensor  # (n,) int64, parents[0] = -1
    depths: torch.Tensor  # (n,) int64, depths[0] = 0
    scores: torch.Tensor  # (n,) float32 cumulative draft log-prob (root 0)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def ancestor_mask(self) -> torch.Tensor:
        """(n, n) bool: True where node j is node i itself or one of its ancestors."""
        return ancestor_mask(self.parents)

    def children(self) -> list[list[int]]:
        """Children of every node, best draft score first."""
        kids: list[list[int]] = [[] for _ in range(len(self))]
        for node, parent in enumerate(self.parents.tolist()):
            if parent >= 0:
                kids[parent].append(node)
        scores = self.scores.tolist()
        for group in kids:
            group.sort(key=lambda node: -scores[node])
        return kids


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """(n, n) bool mask of self-or-ancestor for nodes whose parents precede them."""
    n = parents.shape[0]
    mask = torch.eye(n, dtype=torch.bool)
    for node, parent in enumerate(parents.tolist()):
        if parent >= 0:
            mask[node] |= mask[parent]
    return mask


def select_nodes(
    parents: torch.Tensor, scores: torch.Tensor, depths: torch.Tensor, count: int
) -> torch.Tensor:
    """Indices of the `count` best candidates, closed under ancestry, sorted by depth.

    parents index into the same candidate list (-1 for children of the root). Ties go to the
    shallower, then earlier candidate, so a parent always ranks before its children.
    """
    n = scores.shape[0]
    order = sorted(range(n), key=lambda i: (-float(scores[i]), int(depths[i]), i))
    chosen: set[int] = set()
    for index in order:
        if len(chosen) == count:
            break
        parent = int(parents[index])
        if parent < 0 or parent in chosen:
            chosen.add(index)
    return torch.tensor(sorted(chosen, key=lambda i: (int(depths[i]), i)), dtype=torch.long)
