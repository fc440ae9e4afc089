"""The decoding loop: one loop for plain (AR) and speculative (sparrow / eagle) decoding.

    prefill -> first token
    repeat: propose a tree rooted at the last token -> verify it in one target forward
            -> accept a path (+ bonus token) -> keep that path in both caches -> emit

Plain decoding is the same loop with a proposer that drafts nothing: the tree is the root
alone, the verify forward is one decode step, and the bonus token is the next token.
Stopping follows transformers' `generate`: a token in eos_token_ids is emitted and ends the
answer; at most max_new_tokens tokens are emitted. See accept.py for tau, bonus, DSR/ESR.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from sparrow.draft import DraftModel
from sparrow.draft.modes import MODES, prefill_layers
from sparrow.errors import ConfigError
from sparrow.speculative.accept import Acceptance, accept_greedy, accept_sampled
from sparrow.speculative.autotree import FALLBACK, MAX_TOTAL, choose_tree, costs_for
from sparrow.speculative.proposers import DraftProposer, NoDraftProposer
from sparrow.speculative.sampling import GREEDY, SamplingParams
from sparrow.speculative.tree import AUTO, DEFAULT_TREE, Tree, TreeSpec
from sparrow.targets.base import StepOutput, TargetAdapter

METHODS = ("ar", *MODES)  # plain decoding, then one method per draft mode
DEFAULT_MAX_NEW_TOKENS = 256
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs


@dataclass
class Timings:
    prefill_s: float = 0.0
    decode_s: float = 0.0  # everything after the prefill: draft + verify + the rest
    draft_s: float = 0.0  # the draft's pass over the prompt included
    verify_s: float = 0.0  # the target's forwards over the trees (acceptance and cache upkeep: the rest)
    draft_prefill_s: float = 0.0  # the draft's pass over the prompt (all of it in eagle mode)


@dataclass
class TokenLogprob:
    """An emitted token's log-probability under the target, and the `k` most likely tokens
    at its position with theirs, most likely first. The distribution is the target's raw one
    (log-softmax of its logits, before temperature, top-k and top-p), whatever the sampling
    settings: vLLM's default, and what transformers' `generate(output_logits=True)` reports."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """(n, V) logits at n positions and the n tokens emitted there -> their TokenLogprobs."""
    logprobs = torch.log_softmax(logits[: len(tokens)].float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    values, indices = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    return [TokenLogprob(token, lp, list(zip(ids, vals, strict=True)))
            for token, lp, ids, vals in zip(tokens, chosen, indices.tolist(), values.tolist(), strict=True)]


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens only
    method: str
    num_prompt_tokens: int
    num_visual_tokens: int
    target_calls: int  # target forwards after the prefill (verification calls)
    accepted_lengths: list[int]  # tokens emitted per verification call (bonus included)
    finish_reason: str  # "eos", "length", or "stopped" (by the on_tokens callback)
    timings: Timings = field(default_factory=Timings)
    draft_cache_length: int | None = None  # draft KV positions at the end (None for ar)
    tree: str = ""  # the tree drafted (what `auto` chose)
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when asked for

    @property
    def tau(self) -> float:
        """Mean accepted length: tokens emitted per verification call, bonus included."""
        return sum(self.accepted_lengths) / max(1, self.target_calls)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["tau"] = self.tau
        return data


class _Clock:
    """Wall-clock sections, synchronising the accelerator so GPU time lands where it is spent."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def _proposer(method: str, draft: DraftModel | None, target: TargetAdapter, tree: TreeSpec):
    if method == "ar":
        return NoDraftProposer()
    if draft is None:
        raise ConfigError(f"--method {method} needs a draft: pass --draft DIR")
    # The checkpoint is the same in both modes; the method decides how it is run.
    return DraftProposer(draft, target, tree, mode=method)


def _emit(new_tokens: list[int], emitted: list[int], eos: set[int], max_new_tokens: int) -> str:
    """Append tokens to `emitted` as `generate` would: stop after an EOS token (kept) or at
    max_new_tokens. Returns the finish reason, or "" to go on."""
    for token in new_tokens:
        emitted.append(token)
        if token in eos:
            return "eos"
        if len(emitted) >= max_new_tokens:
            return "length"
    return ""


def _pick(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None) -> int:
    """The target's own choice from (V,) logits: argmax, or a sample of its distribution."""
    if sampling.greedy:
        return int(logits.argmax())
    probs = sampling.probabilities(logits[None])[0]
    return int(torch.multinomial(probs, 1, generator=generator))


def _verify(
    target: TargetAdapter,
    candidates: Tree,
    tree: TreeSpec,
    sampling: SamplingParams,
    generator: torch.Generator | None,
    clock: _Clock,
) -> tuple[StepOutput, Acceptance, torch.Tensor, float]:
    """One target forward over the proposed tree; accept a path; keep only that path in the
    target's cache. Returns the forward's output, the decision, the path (node indices) and
    the forward's seconds."""
    room = target.cache.max_length - target.cache_length
    if len(candidates) > room:
        # The cache was sized for trees of `tree`; a custom proposer may return larger ones.
        raise ConfigError(
            f"the proposer returned a tree of {len(candidates)} tokens, more than the {room} "
            f"cache slots left: the cache was sized for --tree {tree} ({tree.total_tokens} "
            "tokens a round); pass a tree spec whose total_tokens covers the proposer's trees"
        )
    start = target.cache_length
    mask = candidates.ancestor_mask() if len(candidates) > 1 else None
    t = clock.now()
    out = target.forward(candidates.tokens, candidates.depths, mask)
    forward_s = clock.now() - t
    if sampling.greedy:
        decision = accept_greedy(candidates, out.logits)
    else:
        decision = accept_sampled(candidates, out.logits, sampling, generator)
    path = torch.tensor(decision.path)
    target.keep(start, path.to(target.device))
    return out, decision, path, forward_s


@torch.no_grad()
def generate(
    target: TargetAdapter,
    input_ids: torch.Tensor,
    video=None,
    *,
    method: str = "ar",
    draft: DraftModel | None = None,
    tree: TreeSpec | str = DEFAULT_TREE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    sampling: SamplingParams = GREEDY,
    eos_token_ids: list[int] | None = None,
    proposer=None,
    on_tokens=None,
    prefix=None,
    logprobs: int | None = None,
) -> GenerationResult:
    """Generate an answer to `input_ids` (1, L) (+ `video`, a VideoInputs) with `method`.

    `proposer` overrides the method's proposer (anything with start/propose/commit,
    `cache_length` and `prefill_layers`, see proposers.py): the extension point for other drafting strategies.
    The caches are sized for trees of `tree`'s total_tokens; pass a `tree` that covers a
    custom proposer's largest tree (a tree that does not fit is a ConfigError). `tree="auto"`
    picks the tree after the prefill, from costs measured on this machine at this length and
    the draft's acceptance profile (`sparrow.speculative.autotree`).
    `on_tokens(tokens, logprobs)` is called with the tokens each target call emits, as they
    come (streaming), and their TokenLogprobs (None unless asked for); returning True from it
    stops generation (finish_reason "stopped").
    `logprobs=k` (0 to MAX_LOGPROBS) records each emitted token's TokenLogprob with the `k`
    most likely alternatives: read from the logits the target computed anyway (the verify
    forward's at the accepted path), so they are exact under speculative decoding too.
    `prefix` (a PrefixState from `target.snapshot()`) skips prefilling the part of the prompt
    it covers, video included; `target.snapshot()` after this call keeps this prompt.
    """
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise ConfigError(f"logprobs={logprobs}: give 0 to {MAX_LOGPROBS} alternatives a token")
    auto = tree == AUTO
    tree = TreeSpec.parse(tree) if isinstance(tree, str) and not auto else tree
    capacity_tree = TreeSpec(MAX_TOTAL, 1, MAX_TOTAL) if auto else tree  # room for any choice
    if proposer is not None:
        layers = proposer.prefill_layers
    elif method != "ar" and draft is not None:
        layers = prefill_layers(method, draft.config.visual, draft.config.mid_layer)
    else:
        layers = ()
    eos = set(target.eos_token_ids if eos_token_ids is None else eos_token_ids)
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device=target.device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())

    clock = _Clock(target.device)
    timings = Timings()
    t0 = clock.now()
    prefill = target.prefill(  # `layers`: a draft that reads target layers at visual positions
        input_ids, video, capacity=max_new_tokens + capacity_tree.total_tokens + 1, layers=layers,
        prefix=prefix,  # used if it kept those layers' states (see TargetAdapter.prefill)
    )
    if auto:  # measured costs at this length, the draft's acceptance profile
        tree = FALLBACK if method == "ar" or draft is None else choose_tree(
            draft.config.acceptance, costs_for(target, draft, target.cache_length, method))[0]
    if proposer is None:
        proposer = _proposer(method, draft, target, tree)
    first = _pick(prefill.logits, sampling, generator)
    timings.prefill_s = clock.now() - t0

    emitted, accepted_lengths = [first], []
    recorded = None if logprobs is None else token_logprobs(prefill.logits[None], [first], logprobs)
    finish = "eos" if first in eos else ("length" if max_new_tokens == 1 else "")
    if on_tokens is not None and on_tokens([first], recorded) and not finish:
        finish = "stopped"
    t_decode = clock.now()
    if not finish:
        t = clock.now()
        proposer.start(prefill, first, capacity=max_new_tokens + capacity_tree.total_tokens)
        timings.draft_prefill_s = clock.now() - t
        timings.draft_s += timings.draft_prefill_s
    root = first
    while not finish:
        t = clock.now()
        candidates = proposer.propose(root)
        timings.draft_s += clock.now() - t
        out, decision, path, forward_s = _verify(target, candidates, capacity_tree, sampling, generator,
                                                 clock)
        timings.verify_s += forward_s
        new_tokens = candidates.tokens[path[1:]].tolist() + [decision.bonus]
        before = len(emitted)
        finish = _emit(new_tokens, emitted, eos, max_new_tokens)
        accepted_lengths.append(len(emitted) - before)  # tokens cut by a stop do not count
        new_logprobs = None
        if logprobs is not None:  # token i of the round was chosen at node path[i]
            new_logprobs = token_logprobs(out.logits[path.to(out.logits.device)], emitted[before:],
                                          logprobs)
            recorded += new_logprobs
        if on_tokens is not None and on_tokens(emitted[before:], new_logprobs) and not finish:
            finish = "stopped"
        if finish:
            break
        t = clock.now()
        proposer.commit(out.hidden[path.to(out.hidden.device)], torch.tensor(new_tokens))
        timings.draft_s += clock.now() - t
        root = decision.bonus
    timings.decode_s = clock.now() - t_decode
    return GenerationResult(
        token_ids=emitted,
        method=method,
        num_prompt_tokens=int(prefill.input_ids.shape[0]),
        num_visual_tokens=int(prefill.visual_mask.sum()),
        target_calls=len(accepted_lengths),
        accepted_lengths=accepted_lengths,
        finish_reason=finish,
        timings=timings,
        draft_cache_length=proposer.cache_length,
        tree=str(tree),
        logprobs=recorded,
    )
