"""`sparrow train`: train a draft on `sparrow datagen` data, under HF accelerate.

The same command runs as one process (CPU or one GPU) or as several (`accelerate launch`,
`torchrun`: DDP, gloo on CPUs): each process takes its share of every global batch and the
loss is normalised by the global number of scored pairs, so N processes train the weights one
process does with the same global batch (up to float summation order).

Schedule: stage 1 over the text-only samples (`stage1_epochs`), then stage 2 over all of them
(`epochs`), as the paper trains (METHOD.md section 2); batches are a fixed function of
(seed, step), and so is the noise on the target states, so a run resumed from its checkpoint
continues exactly as if it had never stopped. A checkpoint is written every
`checkpoint_every` steps and at the end (`OUT/checkpoint/`); the held-out tau (greedy chains
of `eval_depth`, `objective.chain_acceptance`) every `eval_every` steps. OUT ends up a draft
checkpoint (`config.json`, `model.safetensors`: `--draft OUT`) with `log.jsonl`, `train.json`
and `loss.png` beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sparrow.draft.checkpoint import new_draft, save_draft
from sparrow.draft.model import DraftConfig
from sparrow.draft.modes import inference_visual
from sparrow.errors import ConfigError, DataError
from sparrow.training.config import TrainConfig
from sparrow.training.data import Sample, draft_vocabulary, load_dataset, split, subset
from sparrow.training.datagen import target_fingerprint
from sparrow.training.objective import Frozen, chain_acceptance, losses, make_batch, rank_counts

CHECKPOINT = "checkpoint"
LOG = "log.jsonl"


class Plan:
    """Which samples make global batch `step`: stage 1 (text only) epochs, then stage 2."""

    def __init__(self, train: list[Sample], config: TrainConfig):
        self.config = config
        text = [i for i, s in enumerate(train) if not s.has_video]
        self.pools = [(1, text, config.stage1_epochs if text else 0.0),
                      (2, list(range(len(train))), config.epochs)]
        # full batches only (a short last one is dropped; a pool smaller than a batch is one)
        self.stage_steps = [round(epochs * self._per_epoch(pool)) if pool else 0
                            for _, pool, epochs in self.pools]
        self.total = sum(self.stage_steps)

    def _per_epoch(self, pool: list[int]) -> int:
        return max(1, len(pool) // self.config.batch_size)

    def batch(self, step: int) -> tuple[int, int, list[int]]:
        """(stage, epoch, sample indices) of global batch `step`."""
        size = self.config.batch_size
        for (stage, pool, _), steps in zip(self.pools, self.stage_steps, strict=True):
            if step < steps:
                per_epoch = self._per_epoch(pool)
                epoch, within = divmod(step, per_epoch)
                generator = torch.Generator().manual_seed(self.config.seed * 7919 + stage * 104729 + epoch)
                order = torch.randperm(len(pool), generator=generator).tolist()
                return stage, epoch, [pool[i] for i in order[within * size:(within + 1) * size]]
            step -= steps
        raise IndexError(step)


def _noise(samples: list[Sample], batch, config: TrainConfig, step: int) -> torch.Tensor | None:
    """U(-noise, noise) on the fed target states, a fixed function of (seed, step, sample)."""
    if not config.noise:
        return None
    rows = []
    for sample in samples:
        seed = int.from_bytes(hashlib.blake2b(f"{config.seed}/{step}/{sample.key}".encode(),
                                              digest_size=8).digest(), "big") >> 1
        generator = torch.Generator().manual_seed(seed)
        rows.append((torch.rand(batch.features.shape[1:], generator=generator) * 2 - 1) * config.noise)
    return torch.stack(rows)


def _frozen(target, vocab: torch.Tensor | None, device) -> Frozen:
    embedding = target.model.get_input_embeddings().weight.detach().float().to(device)
    full = target.model.get_output_embeddings().weight.detach().float().to(device)
    return Frozen(embedding=embedding, head=full if vocab is None else full[vocab.to(device)],
                  full_head=full, vocab=None if vocab is None else vocab.to(device))


def _init_from_target(draft, target) -> None:
    """Start the draft's decoder layer from the target's last one (same shapes; its input norm
    is not used by the draft)."""
    source = target.model.model.language_model.layers[-1].state_dict()
    own = draft.layer.state_dict()
    copied = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not copied:
        raise ConfigError("--init target: the target's last layer shares no weights with the draft's")
    draft.layer.load_state_dict({**own, **{k: v.detach().float() for k, v in copied.items()}})


def _schedule(config: TrainConfig, total: int):
    warm = max(1, round(config.warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))
    return factor


def _evaluate(model, held: list[Sample], frozen: Frozen, config: TrainConfig, accelerator) -> float:
    """Held-out chain tau of the draft as it decodes (`inference_visual`: a sparrow-mode draft
    sees the text only, whatever its visual positions carried in training)."""
    accepted = torch.zeros(2)
    for start in range(accelerator.process_index * config.batch_size, len(held),
                       config.batch_size * accelerator.num_processes):
        batch = make_batch(held[start:start + config.batch_size],
                           inference_visual(config.mode, config.visual))
        batch = _to(batch, accelerator.device)
        a, n = chain_acceptance(model, batch, frozen, config.eval_depth)
        accepted += torch.tensor([a, n])
    accepted = accelerator.reduce(accepted.to(accelerator.device), "sum").cpu()
    return 1.0 + float(accepted[0]) / max(1.0, float(accepted[1]))


PROFILE_DEPTH, PROFILE_RANKS = 8, 10


def acceptance_profile(draft, samples: list[Sample], frozen: Frozen, config: TrainConfig,
                       device) -> list[list[float]]:
    """p[d][r] over `samples` (see DraftConfig.acceptance; `objective.rank_counts`)."""
    counts = torch.zeros(PROFILE_DEPTH, PROFILE_RANKS + 1)
    for start in range(0, len(samples), config.batch_size):
        batch = make_batch(samples[start:start + config.batch_size],
                           inference_visual(config.mode, config.visual))
        batch = _to(batch, device)
        counts += rank_counts(draft, batch, frozen, PROFILE_DEPTH, PROFILE_RANKS).cpu()
    totals = counts.sum(-1, keepdim=True).clamp(min=1)
    return [[round(float(v), 4) for v in row[:-1]] for row in counts / totals]


def _to(batch, device):
    for name, value in vars(batch).items():
        if isinstance(value, torch.Tensor):
            setattr(batch, name, value.to(device))
    return batch


def _save_checkpoint(out: Path, model, optimizer, scheduler, step: int, tokens: int,
                     identity: dict) -> None:
    tmp, final = out / (CHECKPOINT + ".partial"), out / CHECKPOINT
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(tmp / "draft.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "tokens": tokens, **identity}, indent=2))
    old = out / (CHECKPOINT + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _resume(out: Path, model, optimizer, scheduler, identity: dict) -> tuple[int, int]:
    """Load `out`'s checkpoint into model, optimizer and scheduler; (step, tokens) to continue
    from ((0, 0) without one)."""
    path = out / CHECKPOINT
    if not path.is_dir():
        return 0, 0
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    for key, value in json.loads(json.dumps(identity)).items():  # as JSON wrote it
        if state.get(key) != value:
            raise ConfigError(f"--out {out} holds a run with another {key}; use another --out, "
                              "or delete it to start over")
    model.load_state_dict(load_file(str(path / "draft.safetensors")))
    states = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    return state["step"], state["tokens"]


def _append_log(out: Path, record: dict) -> None:
    with open(out / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def _trim_log(out: Path, step: int) -> None:
    """Keep the log records up to the checkpoint's `step` (later ones belong to the run that
    was interrupted after it)."""
    path = out / LOG
    if path.is_file():
        keep = [line for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def train(target, data: list[str | Path], out: str | Path, config: TrainConfig,
          stop_after: int | None = None, progress: bool = True) -> dict:
    """Train a draft for `target` on datagen outputs `data` into `out` (module docstring).
    `stop_after` ends the run after that many steps in total (as an interruption would, with
    a checkpoint), for tests and for training in sittings. Returns the summary."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=target.device.type == "cpu")
    out = Path(out)
    main = accelerator.is_main_process
    started = time.perf_counter()
    dataset = load_dataset(data, target_fingerprint(target))
    mid_layer = dataset.mid_layer if config.mid_layer is None else config.mid_layer
    if config.visual == "mid" and mid_layer != dataset.mid_layer:
        raise DataError(f"--mid-layer {mid_layer}: the data holds layer {dataset.mid_layer}'s states; "
                        f"regenerate it with `sparrow datagen --mid-layer {mid_layer}`")
    train_set, held = split(dataset.samples, config.held_out, config.seed)
    train_set = subset(train_set, config.max_samples, config.seed)  # the same held-out set whatever the size
    if len(train_set) < accelerator.num_processes or config.batch_size < accelerator.num_processes:
        raise ConfigError(f"{accelerator.num_processes} processes need --batch-size and the "
                          f"training samples ({len(train_set)}) to be at least that many")
    vocab = None if config.draft_vocab is None else draft_vocabulary(train_set, config.draft_vocab)
    plan = Plan(train_set, config)
    record = {**config.to_dict(), "data": [str(d) for d in data], "samples": len(train_set),
              "held_out_samples": len(held)}
    draft_config = DraftConfig.for_target(target, config.mode, config.visual, mid_layer,
                                          None if vocab is None else int(vocab.shape[0]))
    draft_config.training = record
    draft = new_draft(draft_config, config.seed)
    if vocab is not None:
        draft.vocab.copy_(vocab)
    if config.init == "target":
        _init_from_target(draft, target)
    draft.train()
    optimizer = torch.optim.AdamW(draft.parameters(), lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(draft, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config, plan.total))
    identity = {"config": config.to_dict(), "data": [m["target"]["weights"] + f"/{len(dataset.samples)}"
                                                      for m in dataset.manifests]}
    out.mkdir(parents=True, exist_ok=True)
    step, tokens = _resume(out, accelerator.unwrap_model(model), optimizer, scheduler, identity)
    if main:
        _trim_log(out, step)
    frozen = _frozen(target, vocab, accelerator.device)
    end = plan.total if stop_after is None else min(plan.total, stop_after)
    bar = tqdm(total=plan.total, initial=step, desc=f"train {config.preset}", unit="step",
               disable=not (main and progress))
    tau = None
    while step < end:
        stage, epoch, indices = plan.batch(step)
        samples = [train_set[i] for i in indices[accelerator.process_index::accelerator.num_processes]]
        batch = _to(make_batch(samples, config.visual), accelerator.device)
        local = torch.tensor(float(batch.scored.sum()), device=accelerator.device)
        count = float(accelerator.reduce(local, "sum"))
        noise = _noise(samples, batch, config, step)
        loss, per_pass = losses(model, batch, frozen, config, max(count, 1.0) / accelerator.num_processes,
                                None if noise is None else noise.to(accelerator.device))
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        step += 1
        tokens += int(count)
        loss_value = float(accelerator.reduce(loss.detach(), "sum"))
        if main:
            _append_log(out, {"step": step, "stage": stage, "epoch": epoch, "loss": loss_value,
                              "ce": per_pass, "lr": scheduler.get_last_lr()[0], "tokens": tokens})
        if held and (step % config.eval_every == 0 or step == plan.total):
            bare = accelerator.unwrap_model(model)  # no DDP collectives: ranks run unequal batches
            bare.eval()
            tau = _evaluate(bare, held, frozen, config, accelerator)
            bare.train()
            if main:
                _append_log(out, {"step": step, "tokens": tokens, "held_out_tau": tau})
        if step % config.checkpoint_every == 0 or step == end:
            accelerator.wait_for_everyone()
            if main:
                _save_checkpoint(out, accelerator.unwrap_model(model), optimizer, scheduler, step, tokens,
                                 identity)
        bar.set_postfix(loss=f"{loss_value:.3f}", tau="-" if tau is None else f"{tau:.2f}")
        bar.update(1)
    bar.close()
    accelerator.wait_for_everyone()
    summary = {"preset": config.preset, "steps": step, "total_steps": plan.total, "tokens": tokens,
               "samples": len(train_set), "held_out_samples": len(held),
               "answer_tokens": sum(int(s.loss_mask.sum()) for s in train_set),
               "wall_s_this_run": round(time.perf_counter() - started, 1),
               "processes": accelerator.num_processes, "finished": step >= plan.total}
    if vocab is not None:
        summary["draft_vocab_size"] = int(vocab.shape[0])
        covered = torch.zeros(target.vocab_size, dtype=torch.bool)
        covered[vocab] = True
        answer = torch.cat([s.input_ids[s.loss_mask] for s in held or train_set])
        summary["draft_vocab_coverage"] = float(covered[answer].float().mean())
    if main:
        draft = accelerator.unwrap_model(model)
        if step >= plan.total:  # measured once, on what it was not trained on
            draft.eval()
            draft.config.acceptance = acceptance_profile(draft, held or train_set[:64], frozen,
                                                         config, accelerator.device)
        save_draft(draft, out)
        summary["held_out_tau"] = _last_tau(out)
        summary["held_out_curve"] = [[r["step"], r["tokens"], round(r["held_out_tau"], 4)]
                                     for r in _records(out) if "held_out_tau" in r]
        summary["config"] = config.to_dict()
        (out / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_log(out)
    return summary


def _records(out: Path) -> list[dict]:
    path = out / LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def _last_tau(out: Path) -> float | None:
    records = _records(out)
    taus = [r["held_out_tau"] for r in records if "held_out_tau" in r]
    return taus[-1] if taus else None


def plot_log(out: Path) -> Path:
    """`loss.png`: the training loss by step, and the held-out tau by training tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _records(out)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "held_out_tau" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8)
    left.set_xlabel("step")
    left.set_ylabel("loss (sum over MTP passes)")
    left.set_yscale("log")
    right.plot([r["tokens"] for r in evals], [r["held_out_tau"] for r in evals], marker="o")
    right.set_xlabel("answer tokens trained on")
    right.set_ylabel("held-out chain tau")
    fig.suptitle(f"{out.name}")
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


