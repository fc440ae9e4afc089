"""The training objective: a batch of samples as draft sequences, the MTP passes, the losses,
and the held-out chain acceptance (METHOD.md section 2).

A draft sequence is a list of pairs over the positions the draft is fed (`visual` none: the
text positions; otherwise every position). Pair i, at position t_i, feeds the draft the
target's state h_{t_i} and the embedding of the next fed token x_{t_{i+1}}, as decoding does
(`speculative.proposers`); its output stands in for h_{t_{i+1}}, so it is scored against the
target's next-token distribution softmax(lm_head(h_{t_{i+1}})) where token t_{i+1} + 1 is an
answer token. Visual positions of `mid` / `embed` drafts carry those states as they are and
are not scored.

MTP: pass j + 1 feeds pair i the draft's own pass-j output at pair i - 1 instead of h_{t_i}
(where both are pairs, not visual states); visual states stay fixed. Pass j's output at pair
i is then what a chain of j draft steps started at pair i - j + 1 predicts, which is also how
the held-out tau is read off: the chain accepts while the draft's top token equals the
target's, pass after pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparrow.draft.modes import DIRECT, training_positions
from sparrow.training.config import TrainConfig
from sparrow.training.data import Sample


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, n) int64: x_{t_{i+1}}, the token fed with pair i
    features: torch.Tensor  # (B, n, d) float32: h_{t_i}
    labels: torch.Tensor  # (B, n, d) float32: h_{t_{i+1}}, what pair i's output stands in for
    positions: torch.Tensor  # (B, n) int64: the draft's own positions 0..n-1
    scored: torch.Tensor  # (B, n) bool: pair i is scored (answer token next, not padding)
    chained: torch.Tensor  # (B, n) bool: MTP may feed pair i the output at pair i - 1
    direct: torch.Tensor | None  # (B, n, d) float32 visual states fed as they are, or None
    direct_mask: torch.Tensor | None  # (B, n) bool


def _pairs(sample: Sample, visual: str) -> dict[str, torch.Tensor]:
    kept = training_positions(visual, sample.visual_mask)  # (n + 1,)
    here, nxt = kept[:-1], kept[1:]
    length = sample.input_ids.shape[0]
    after = (nxt + 1).clamp(max=length - 1)
    is_direct = sample.visual_mask[here] & (visual in DIRECT)
    scored = sample.loss_mask[after] & (nxt + 1 < length) & ~is_direct
    chained = ~is_direct & torch.cat([torch.zeros(1, dtype=torch.bool), ~is_direct[:-1]])
    pairs = {
        "tokens": sample.input_ids[nxt],
        "features": sample.last[here].float(),
        "labels": sample.last[nxt].float(),
        "scored": scored,
        "chained": chained,
        "direct_mask": is_direct,
    }
    if visual in DIRECT:
        states = sample.mid if visual == "mid" else sample.embed
        rank = sample.visual_mask.long().cumsum(0) - 1  # index among the visual positions
        direct = torch.zeros_like(pairs["features"])
        direct[is_direct] = states[rank[here][is_direct]].float()
        pairs["direct"] = direct
    return pairs


def make_batch(samples: list[Sample], visual: str) -> Batch:
    """Right-padded draft sequences of `samples` (padding is never scored and, causal, never
    seen by a real position)."""
    per = [_pairs(s, visual) for s in samples]
    n = max(p["tokens"].shape[0] for p in per)

    def stack(key):
        rows = [p[key] for p in per]
        return torch.stack([F.pad(r, (0, 0) * (r.dim() - 1) + (0, n - r.shape[0])) for r in rows])

    direct = visual in DIRECT
    return Batch(
        tokens=stack("tokens"), features=stack("features"), labels=stack("labels"),
        positions=torch.arange(n).expand(len(samples), n),
        scored=stack("scored"), chained=stack("chained"),
        direct=stack("direct") if direct else None,
        direct_mask=stack("direct_mask") if direct else None,
    )


@dataclass
class Frozen:
    """The target's parts the draft shares, frozen: embedding and lm_head rows."""

    embedding: torch.Tensor  # (V, d)
    head: torch.Tensor  # (N, d): the lm_head rows of the draft's vocabulary (N = V: all)
    full_head: torch.Tensor  # (V, d): the target's whole lm_head, for its own distribution
    vocab: torch.Tensor | None  # (N,) int64 target ids of `head`'s rows, or None (all)


def _unroll(draft, batch: Batch, frozen: Frozen, passes: int, noise: torch.Tensor | None):
    """Run `passes` MTP passes; yields each pass's outputs (B, n, d)."""
    embeds = F.embedding(batch.tokens, frozen.embedding)
    target_features = batch.features if noise is None else batch.features + noise
    features = target_features
    for _ in range(passes):
        out = draft(embeds, features, batch.positions, direct=batch.direct,
                    direct_mask=batch.direct_mask)
        yield out
        shifted = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
        features = torch.where(batch.chained[..., None], shifted, target_features)


def target_distribution(labels: torch.Tensor, frozen: Frozen) -> torch.Tensor:
    """(M, N) the target's next-token probabilities from its states `labels` (M, d), over the
    draft's vocabulary (renormalised there: the draft can only spread its mass over it)."""
    with torch.no_grad():  # `head` holds the vocabulary's rows: the other logits would be dropped
        return torch.softmax((labels @ frozen.head.T).float(), dim=-1)  # (M, N)


def losses(draft, batch: Batch, frozen: Frozen, config: TrainConfig, count: float,
           noise: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """The weighted sum over MTP passes of soft cross-entropy (+ SmoothL1 on features), each
    summed over scored pairs and divided by `count` (the global number of scored pairs, so
    processes that each see part of a batch add up to the whole). Returns it and the
    per-pass cross-entropies (means over this process's pairs)."""
    scored = batch.scored
    target = target_distribution(batch.labels[scored], frozen)  # (M, N)
    total = torch.zeros(())
    per_pass = []
    for weight, out in zip(config.pass_weights, _unroll(draft, batch, frozen, config.mtp, noise),
                           strict=True):
        hidden = out[scored]  # (M, d)
        log_q = torch.log_softmax(hidden @ frozen.head.T, dim=-1)
        ce = -(target * log_q).sum()
        loss = ce
        if config.feature_weight:
            loss = loss + config.feature_weight * F.smooth_l1_loss(
                hidden, batch.labels[scored], reduction="none").mean(-1).sum()
        total = total + weight * loss / count
        per_pass.append(float(ce.detach()) / max(1, hidden.shape[0]))
    return total, per_pass


@torch.no_grad()
def chain_acceptance(draft, batch: Batch, frozen: Frozen, depth: int) -> tuple[float, int]:
    """(sum of accepted lengths, number of chains) of greedy chains of `depth` draft tokens
    started at every scored pair: a chain accepts while the draft's top token equals the
    target's (mean accepted + 1 is the chain tau; a tree accepts at least as much)."""
    scored = batch.scored
    target_top = torch.full(scored.shape, -1, dtype=torch.long)
    target_top[scored] = (batch.labels[scored] @ frozen.full_head.T).argmax(-1)
    hits = []
    for out in _unroll(draft, batch, frozen, depth, None):
        top = (out @ frozen.head.T).argmax(-1)
        if frozen.vocab is not None:
            top = frozen.vocab[top]
        hits.append((top == target_top) & scored)  # (B, n)
    alive = scored.clone()
    accepted = torch.zeros(scored.shape, dtype=torch.long)
    for j, hit in enumerate(hits):  # chain started at pair s reads pass j at pair s + j
        shifted = torch.zeros_like(hit)
        shifted[:, : hit.shape[1] - j] = hit[:, j:]
        alive = alive & shifted
        accepted += alive.long()
    return float(accepted[scored].sum()), int(scored.sum())


@torch.no_grad()
def rank_counts(draft, batch: Batch, frozen: Frozen, depth: int, ranks: int) -> torch.Tensor:
    """(depth, ranks + 1) counts: at chain depth j + 1 (pass j + 1 at pairs whose chain, started
    j pairs earlier, lies inside the scored answer), how often the target's token is the
    draft's (r + 1)-th choice (last column: lower than `ranks`, or outside its vocabulary)."""
    scored = batch.scored
    target_top = torch.full(scored.shape, -1, dtype=torch.long)
    target_top[scored] = (batch.labels[scored] @ frozen.full_head.T).argmax(-1)
    run = torch.zeros(scored.shape, dtype=torch.long)  # scored pairs in a row, ending here
    for i in range(scored.shape[1]):
        run[:, i] = torch.where(scored[:, i], (run[:, i - 1] if i else 0) + 1, 0)
    lookup = None
    if frozen.vocab is not None:  # row of each target token in the draft's head, or -1
        lookup = torch.full((int(frozen.full_head.shape[0]),), -1, dtype=torch.long)
        lookup[frozen.vocab] = torch.arange(frozen.vocab.shape[0])
    counts = torch.zeros(depth, ranks + 1)
    for j, out in enumerate(_unroll(draft, batch, frozen, depth, None)):
        valid = run > j
        logits = out[valid] @ frozen.head.T  # (m, N)
        wanted = target_top[valid] if lookup is None else lookup[target_top[valid]]
        known = wanted >= 0
        rank = torch.full(wanted.shape, ranks, dtype=torch.long)
        own = logits[known].gather(1, wanted[known, None])
        rank[known] = (logits[known] > own).sum(-1).clamp(max=ranks)
        counts[j] += torch.bincount(rank, minlength=ranks + 1).float()
    return counts
