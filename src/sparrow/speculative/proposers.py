"""Proposers: what the decoding loop asks for a tree each round.

`NoDraftProposer` proposes nothing (the tree is the root alone): the loop then is plain
autoregressive decoding on the same adapter and cache. `DraftProposer` runs the one-layer
draft beside the target and drafts EAGLE-2 trees.

The draft's sequence is a list of pairs (h_t, x_{t+1}): the target's feature at a position and
the next token. In `sparrow` mode the pairs are taken over the text positions only: visual
positions are removed and each text position is paired with the next *text* token, so the
video shrinks to its start/end markers (Qwen) or to nothing (LLaVA) and the draft's cache
length equals the number of text tokens. In `eagle` mode every position is a pair, or, for
drafts whose visual positions carry a target layer's states (`mid`, `embed`), those states
(the prefill captures them: `prefill_layers`).
"""

from __future__ import annotations

import torch

from sparrow.draft import DraftModel
from sparrow.draft.modes import draft_positions, prefill_layers, visual_layer
from sparrow.runtime.attention import TreeMask
from sparrow.runtime.linear import pack_linears
from sparrow.speculative.tree import Tree, TreeSpec, select_nodes
from sparrow.targets.base import PrefillOutput, TargetAdapter


def root_only(root: int) -> Tree:
    return Tree(
        tokens=torch.tensor([root]),
        parents=torch.tensor([-1]),
        depths=torch.tensor([0]),
        scores=torch.zeros(1),
    )


class NoDraftProposer:
    """Plain decoding: every round verifies the root alone (one decode step)."""

    cache_length = None
    prefill_layers = ()

    def start(self, prefill: PrefillOutput, first_token: int, capacity: int) -> None:
        pass

    def propose(self, root: int) -> Tree:
        return root_only(root)

    def commit(self, features: torch.Tensor, next_tokens: torch.Tensor) -> None:
        pass


class DraftProposer:
    """Keeps the draft's cache in step with the target's committed tokens; drafts trees."""

    def __init__(
        self, draft: DraftModel, target: TargetAdapter, spec: TreeSpec, mode: str | None = None
    ):
        spec.validate()
        self.draft, self.target, self.spec = draft, target, spec
        self.mode = mode or draft.mode  # see sparrow.draft.modes
        self.length = 0  # committed pairs in the draft cache
        self.cache = None
        self.last_output: torch.Tensor | None = None  # (d,) output at the last committed pair
        config = draft.config
        self.visual_layer = visual_layer(self.mode, config.visual, config.mid_layer)
        self.prefill_layers = prefill_layers(self.mode, config.visual, config.mid_layer)
        # what the draft predicts over: the target's lm_head, or, for a reduced vocabulary,
        # a linear of its N rows (a copy, packed like every draft linear)
        self.head = target.model.get_output_embeddings()
        if config.draft_vocab_size is not None:
            weight = draft.head_weight(self.head.weight.detach())  # (N, d)
            self.head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False,
                                        device=weight.device, dtype=weight.dtype)
            self.head.weight = torch.nn.Parameter(weight, requires_grad=False)
            pack_linears(self.head)

    @property
    def cache_length(self) -> int:
        return self.length


    def start(self, prefill: PrefillOutput, first_token: int, capacity: int) -> None:
        """Feed the prompt's pairs; `first_token` is the token the target chose after it."""
        device = prefill.hidden.device
        kept = draft_positions(self.mode, prefill.visual_mask)  # (n,)
        sequence = torch.cat([prefill.input_ids, torch.tensor([first_token], device=device)])
        following = torch.cat([kept[1:], torch.tensor([sequence.shape[0] - 1], device=device)])
        levels = self.spec.depth * self.spec.top_k
        self.cache = self.draft.new_cache(kept.shape[0] + capacity + levels)
        self.length = 0
        direct = None
        if self.visual_layer is not None:
            direct = (prefill.layer_hidden[self.visual_layer][kept], prefill.visual_mask[kept])
        self._append(prefill.hidden[kept], sequence[following], direct)

    def commit(self, features: torch.Tensor, next_tokens: torch.Tensor) -> None:
        """Append committed pairs: features (k, d) target hidden states, next_tokens (k,)."""
        self._append(features, next_tokens)

    @torch.no_grad()
    def _append(
        self,
        features: torch.Tensor,
        next_tokens: torch.Tensor,
        direct: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Append pairs to the draft cache; `direct` ((k, d) states, (k,) bool mask): positions
        fed those states as they are (visual positions of `mid` / `embed` drafts)."""
        self.cache.truncate(self.length)  # forget the last round's drafted tree
        k = next_tokens.shape[0]
        positions = torch.arange(self.length, self.length + k, device=features.device)[None]
        mask = None
        if k > 1 and self.length > 0:
            causal = torch.ones(k, k, dtype=torch.bool, device=features.device).tril()
            mask = TreeMask(causal, self.length + k, features.dtype)
        out = self.draft(
            self.target.embed(next_tokens.to(features.device))[None],
            features[None],
            positions,
            self.cache,
            mask,
            direct=None if direct is None else direct[0][None],
            direct_mask=None if direct is None else direct[1][None],
        )
        self.length += k
        self.last_output = out[0, -1]

    def _top(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft's k best next tokens after each of hidden (b, d): log-probs (b, k) over
        its vocabulary and their target token ids (b, k)."""
        top = torch.log_softmax(self.head(hidden).float(), dim=-1).topk(k)
        return top.values, self.draft.token_ids(top.indices)

    @torch.no_grad()
    def propose(self, root: int) -> Tree:
        spec, device = self.spec, self.last_output.device
        k = spec.top_k
        top_values, top_tokens = self._top(self.last_output[None], k)
        tokens = [top_tokens[0]]  # per level, candidate tokens
        scores = [top_values[0]]  # cumulative log-probs
        parents = [torch.full((k,), -1, dtype=torch.long)]  # candidate index of the parent
        depths = [torch.ones(k, dtype=torch.long)]
        offset = 0  # candidate index of the first node of the current level
        beams = torch.arange(k)  # candidate indices (within the level) to expand
        beam_features = self.last_output.expand(k, -1)  # (k, d) parent outputs
        in_cache: list[int] = []  # candidate indices written to the draft cache, in order
        in_cache_parent: list[int] = []  # their position in in_cache of their parent, or -1
        for level in range(1, spec.depth):
            level_tokens, level_scores = tokens[-1], scores[-1]
            b = beams.shape[0]
            # Visibility of the new beams over the tree part of the draft cache (+ themselves).
            m = len(in_cache) + b
            visible = torch.zeros(b, m, dtype=torch.bool)
            for i, beam in enumerate(beams.tolist()):
                row = len(in_cache) + i
                visible[i, row] = True
                parent = int(parents[-1][beam])
                j = in_cache.index(parent) if parent >= 0 else -1
                while j >= 0:
                    visible[i, j] = True
                    j = in_cache_parent[j]
                in_cache_parent.append(in_cache.index(parent) if parent >= 0 else -1)
            in_cache.extend((offset + beams.cpu()).tolist())
            mask = TreeMask(visible.to(device), self.length + m, beam_features.dtype)
            positions = torch.full((1, b), self.length + level - 1, device=device)
            out = self.draft(
                self.target.embed(level_tokens[beams].to(device))[None],
                beam_features[None],
                positions,
                self.cache,
                mask,
            )[0]  # (b, d)
            child_values, child_tokens = self._top(out, k)  # (b, k) each
            child_scores = (level_scores[beams, None] + child_values).flatten()  # (b*k,)
            tokens.append(child_tokens.flatten())
            scores.append(child_scores)
            parents.append((offset + beams.cpu()).repeat_interleave(k))
            depths.append(torch.full((b * k,), level + 1, dtype=torch.long))
            offset += level_tokens.shape[0]
            best = child_scores.topk(min(k, child_scores.shape[0])).indices  # (k,)
            beams = best
            beam_features = out[best // k]
        all_tokens = torch.cat(tokens).cpu()
        all_scores = torch.cat(scores).float().cpu()
        all_parents = torch.cat(parents)
        all_depths = torch.cat(depths)
        chosen = select_nodes(all_parents, all_scores, all_depths, spec.total_tokens - 1)
        position = {int(c): i + 1 for i, c in enumerate(chosen.tolist())}
        tree_parents = [-1] + [
            0 if int(all_parents[c]) < 0 else position[int(all_parents[c])] for c in chosen.tolist()
        ]
        return Tree(
            tokens=torch.cat([torch.tensor([root]), all_tokens[chosen]]),
            parents=torch.tensor(tree_parents),
            depths=torch.cat([torch.zeros(1, dtype=torch.long), all_depths[chosen]]),
            scores=torch.cat([torch.zeros(1), all_scores[chosen]]),
        )
