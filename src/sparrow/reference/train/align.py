"""Stage 1b, `align`: the projector alone, its output regressed onto SmolLM2's word embeddings.

The tower stays frozen and there is no language model: the projector's pooled output (the
visual tokens as the language model receives them) is regressed onto SmolLM2's word embeddings
of what is on each block ('small red circle', 'beige noisy', where it is, what happens there),
so the language model can read the visual tokens from the first caption step. Without it the
projector has to learn the mapping through the language model, which meanwhile learns to write
fluent descriptions that ignore the video, while the visual tokens' norm grows far beyond a word
embedding's (MODEL_CARD.md). The align stage runs on the CPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sparrow.reference import assembly, synthetic
from sparrow.reference.train import data
from sparrow.reference.train.checkpoints import append_log, save_atomic
from sparrow.reference.train.eyes import CHANGES, frame_batch, pooled, tower_states
from sparrow.reference.train.model import tower_state

BACKGROUND_WORDS = {"plain": "plain", "gradient": "gradient", "noise": "noisy", "stripes": "striped"}


def word_embedding(tokenizer, embeddings: torch.Tensor, word: str) -> torch.Tensor:
    """(D,) SmolLM2's input embedding of ' word' (mean over its tokens if it has several)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return embeddings[ids].mean(dim=0)


def region_index(centre: torch.Tensor) -> torch.Tensor:
    """(...,) index into `synthetic.REGIONS` of (..., 2) points (x, y) in [0, 1], as
    `synthetic.region_of` reads them."""
    third = lambda v: torch.where(v < 1 / 3, 0, torch.where(v > 2 / 3, 2, 1))  # noqa: E731
    centre = centre.double()  # the thirds as Python floats, exactly as region_of compares
    return 3 * third(centre[..., 1]) + third(centre[..., 0])


def region_table(tokenizer, embeddings: torch.Tensor) -> torch.Tensor:
    """(9, D) per region of `synthetic.REGIONS` the mean embedding of its words ('top', 'left')."""
    return torch.stack([phrase_embedding(tokenizer, embeddings, region) for region in synthetic.REGIONS])


# The words the descriptions use for what happens, mixed into a patch's align target when it
# happens on that patch (`data.MOTIONS` order after "still", then CHANGES order).
MOTION_WORDS = ("moves left", "moves right", "moves up", "moves down")
CHANGE_WORDS = ("enters", "changes colour", "leaves")


def phrase_embedding(tokenizer, embeddings: torch.Tensor, phrase: str) -> torch.Tensor:
    """(D,) the mean of the word embeddings of a phrase's words."""
    return torch.stack([word_embedding(tokenizer, embeddings, w) for w in phrase.split()]).mean(dim=0)


def patch_targets(tokenizer, embeddings: torch.Tensor, batch: dict) -> torch.Tensor:
    """(B, P, D) what each patch's projected feature should look like: the mean word embedding
    of the object on it and of where that object is ('small', 'red', 'circle', 'top left': the
    third of the frame its centre is in, the words the descriptions use), or of the background
    ('beige', 'noisy'). Why the position: a visual token's place in the frame is otherwise only
    its index among the frame's 16 tokens, and a caption model aligned without it names the
    right objects but puts them in near-random places and gets few events right (MODEL_CARD.md).
    What happens on the patch since the earlier frame the tower compares it with joins the
    mean as one more term each: its object's motion ('moves left'), 'enters', 'changes
    colour'; on the background, 'leaves' where an object has just gone."""
    def table(words: list[str]) -> torch.Tensor:  # (len(words), D)
        return torch.stack([phrase_embedding(tokenizer, embeddings, w) for w in words])

    sizes = table(list(data.SIZE_NAMES))
    colours = table(list(synthetic.COLOUR_NAMES))
    shapes = table(list(synthetic.SHAPES))
    kinds = table([BACKGROUND_WORDS[k] for k in synthetic.BACKGROUND_KINDS])
    bg_colours = table(list(data.BACKGROUND_COLOUR_NAMES))
    objects = batch["colour"] > 0  # (B, P)
    index = lambda labels: (labels - 1).clamp(min=0)  # noqa: E731
    where = region_table(tokenizer, embeddings)[region_index(batch["centre"])]  # (B, P, D)
    thing = sizes[index(batch["size"])] + colours[index(batch["colour"])] + shapes[index(batch["shape"])]
    thing, terms = thing + where, torch.full(objects.shape, 4.0)
    hot = batch["background_colours"]  # (B, 4)
    background = (hot @ bg_colours + kinds[batch["background"]])[:, None, :].expand_as(thing)  # (B, P, D)
    background_terms = (hot.sum(-1, keepdim=True) + 1).expand(objects.shape)
    if "motion" in batch:
        motions, changes = table(list(MOTION_WORDS)), table(list(CHANGE_WORDS))
        moving = (batch["motion"] > 1).float()  # (B, P)
        thing = thing + moving[..., None] * motions[(batch["motion"] - 2).clamp(min=0)]
        terms = terms + moving
        for i, name in enumerate(CHANGES[:2]):  # appeared, recoloured: on the object
            happened = batch[name].float()
            thing, terms = thing + happened[..., None] * changes[i], terms + happened
        left = batch["vanished"].float()  # on what is background now
        background, background_terms = background + left[..., None] * changes[2], background_terms + left
    return torch.where(objects[..., None], thing / terms[..., None],
                       background / background_terms[..., None])  # (B, P, D)


def train_align(run: Path, train: list[Path], val: Path, steps: int, batch: int, lr: float, seed: int,
                eval_every: int) -> Path:
    """Stage 1b: train the projector alone (tower frozen, no language model) so that a patch's
    visual token starts out near the word embeddings of what is on it; the caption stage then
    starts from tokens SmolLM2 can already read, instead of learning the mapping through the LM.
    Cheap (a few minutes); object patches weigh 5x (they are ~10% of the patches)."""
    checkpoint, log = run / "align.pt", run / "align.jsonl"
    if checkpoint.is_file() and torch.load(checkpoint, weights_only=True)["step"] >= steps:
        return checkpoint
    torch.manual_seed(seed)
    model, tokenizer = assembly.build_reference(assembly.TOWER, tower_state(run / "eyes.pt"),
                                                 assembly.ROPE_SCALING, seed=seed,
                                                 video_position_step=assembly.VIDEO_POSITION_STEP)
    tower, projector = model.model.vision_tower.eval(), model.model.multi_modal_projector
    embeddings = model.model.language_model.embed_tokens.weight.detach()  # (V, D)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    corpus = data.load_corpus(train)
    held_out = data.load_shard(val)

    regions = region_table(tokenizer, embeddings)  # (9, D)
    motions = torch.stack([phrase_embedding(tokenizer, embeddings, w) for w in MOTION_WORDS])  # (4, D)

    def loss_of(frames: dict) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            states = tower_states(tower, frames["pixels"])  # (B, P, H)
        target = patch_targets(tokenizer, embeddings, frames)  # (B, P, D)
        tokens = pooled(projector(states))  # (B, blocks, D): the visual tokens SmolLM2 reads
        error = (tokens - target).pow(2).mean(-1)  # (B, P)
        objects = frames["colour"] > 0
        weight = 1 + 4 * objects.float()
        # Where the object is, read back from its tokens: the region whose target (same object
        # words, that region's words) is nearest.
        terms = (4 + frames["appeared"].float() + frames["recoloured"].float()
                 + (frames["motion"] > 1).float())[objects][:, None, None]  # (N, 1, 1) words averaged
        truth = region_index(frames["centre"][objects])  # (N,)
        others = target[objects][:, None] + (regions[None] - regions[truth][:, None]) / terms  # (N, 9, D)
        read = (tokens[objects][:, None] - others).pow(2).sum(-1).argmin(-1) == truth
        metrics = {"val_relative_error": (error.mean() / target.pow(2).mean(-1).mean()).item(),
                   "val_region_accuracy": read.float().mean().item()}
        moving = frames["motion"][objects] > 1  # and which way it moves, among the four
        if moving.any():
            direction = frames["motion"][objects][moving] - 2  # (M,)
            shift = (motions[None] - motions[direction][:, None]) / terms[moving]  # (M, 4, D)
            others = target[objects][moving][:, None] + shift
            read = (tokens[objects][moving][:, None] - others).pow(2).sum(-1).argmin(-1) == direction
            metrics["val_motion_accuracy"] = read.float().mean().item()
        return (error * weight).sum() / weight.sum(), metrics

    for step in tqdm(range(steps), desc="align", unit="step"):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss, _ = loss_of(frame_batch(corpus, np.random.default_rng([seed, 7, step]), batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            with torch.no_grad():
                _, metrics = loss_of(frame_batch(held_out, np.random.default_rng([seed, 2**31]), 256))
            append_log(log, {"step": step + 1, "train_loss": loss.item(), **metrics})
            tqdm.write(f"align step {step + 1}: held-out squared error / target power "
                       f"{metrics['val_relative_error']:.3f}, region read from object tokens "
                       f"{metrics['val_region_accuracy']:.3f}, motion of moving objects "
                       f"{metrics.get('val_motion_accuracy', float('nan')):.3f}")
    save_atomic(checkpoint, {"projector": projector.state_dict(), "step": steps})
    return checkpoint
