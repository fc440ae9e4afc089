"""`sparrow datagen`: self-distilled training data for drafts (METHOD.md section 2).

The target answers each prompt itself (greedy, or sampled at `temperature`), in batches of
prompts with the same frame count (transformers' own `generate`, left padding: a batch of 16
answers costs a few decode steps a token, not 16). Then each prompt + answer runs once more
through the target, teacher-forced, for the states every draft recipe trains on:

    input_ids    (T,) int32      prompt (placeholders included) + answer
    loss_mask    (T,) bool       True at answer tokens
    visual_mask  (T,) bool       True at visual placeholder positions
    last         (T, d) fp16     last hidden state (after the final norm) at every position
    mid          (V, d) fp16     after `mid_layer` layers, at the V visual positions (IVSB)
    embed        (V, d) fp16     the input embeddings there: the projector's output (MSD)

One batch is one shard, `shard-NNNNN.safetensors` (samples concatenated, `offsets` (n+1,) and
`visual_offsets` (n+1,) int64 mark them; `prompt_index` (n,) the prompts they answer), written
atomically: an interrupted run resumes at the first missing shard with nothing duplicated or
lost. `manifest.json` fingerprints the target and records the settings; `prompts.jsonl` the
prompts, in order. Resuming with another target, other settings or other prompts is refused.

`restate` (`sparrow datagen --from DIR --mid-layer M`) rewrites existing data with the visual
states of another m*, from the same prompts and answers (a teacher-forced pass, no generation).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sparrow.errors import DataError
from sparrow.targets import TargetAdapter
from sparrow.training.prompts import Prompt

FORMAT = 1
MANIFEST = "manifest.json"
PROMPTS = "prompts.jsonl"


@dataclass(frozen=True)
class DatagenSettings:
    temperature: float = 0.0
    max_new_tokens: int = 256
    batch_size: int = 16
    mid_layer: int | None = None  # None: L // 2 (what DraftConfig.for_target defaults to)
    seed: int = 0


def target_fingerprint(target: TargetAdapter) -> dict:
    """What identifies the target data was made with: its shape and a hash of its weights."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(target.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {
        "name": target.name,
        "model_type": target.config.model_type,
        "num_layers": target.num_layers,
        "hidden_size": target.hidden_size,
        "vocab_size": target.vocab_size,
        "weights": digest.hexdigest(),
    }


def batches_of(prompts: list[Prompt], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches: prompts with the same frame count together (their videos
    stack), shortest questions together (little padding); a fixed function of the prompts."""
    groups: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt.num_frames or 0, []).append(index)
    batches = []
    for frames in sorted(groups):
        members = sorted(groups[frames], key=lambda i: (len(prompts[i].question), i))
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    return batches


def _open_run(out: Path, prompts: list[Prompt], manifest: dict) -> None:
    """Start `out`, or check that it holds a run of the same target, settings and prompts."""
    path = out / MANIFEST
    lines = "".join(json.dumps(p.to_dict()) + "\n" for p in prompts)
    if path.is_file():
        old = json.loads(path.read_text())
        for key in ("format", "target", "settings"):
            if old.get(key) != manifest[key]:
                raise DataError(
                    f"--out {out} holds data made with another {key} ({old.get(key)} vs "
                    f"{manifest[key]}); choose another --out, or delete it to start over"
                )
        if (out / PROMPTS).read_text() != lines:
            raise DataError(f"--out {out} holds data for other prompts; choose another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / PROMPTS).write_text(lines)
    tmp = out / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def _inputs(target: TargetAdapter, prompt: Prompt):
    from sparrow.api import prepare_video
    from sparrow.video.prompt import build_video_prompt

    video = None
    if prompt.video is not None:
        video = prepare_video(target, prompt.video, num_frames=prompt.num_frames)
    ids = build_video_prompt(target.tokenizer, target.config, video, prompt.question,
                             system=prompt.system)[0]
    return ids, video


def _answers(target: TargetAdapter, items: list, settings: DatagenSettings, seed: int) -> list[list[int]]:
    """The target's answers to a batch of (input_ids (L,), video) with the same video shape,
    by transformers' `generate` on the model as given (left padding), each cut after EOS."""
    from sparrow.targets.llava import prompt_positions, video_position_step
    from sparrow.video.prompt import mm_token_type_ids

    batch, length = len(items), max(ids.shape[0] for ids, _ in items)
    pad = target.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    input_ids = torch.full((batch, length), pad, dtype=torch.long)
    attention = torch.zeros(batch, length, dtype=torch.long)
    for row, (ids, _) in enumerate(items):
        input_ids[row, length - ids.shape[0]:] = ids
        attention[row, length - ids.shape[0]:] = 1
    kwargs = {}
    videos = [video for _, video in items if video is not None]
    if videos:
        for key in videos[0].model_kwargs():
            kwargs[key] = torch.cat([v.model_kwargs()[key] for v in videos]).to(target.device)
    if "qwen" in target.config.model_type:
        kwargs["mm_token_type_ids"] = mm_token_type_ids(input_ids, target.config).to(target.device)
    elif (step := video_position_step(target.config)) != 1:  # transformers numbers on by 1
        positions = torch.zeros(batch, length)
        for row, (ids, _) in enumerate(items):
            positions[row, length - ids.shape[0]:] = prompt_positions(
                ids, target.video_token_id(), step)[0][0]
        kwargs["position_ids"] = positions.to(target.device)
    sampled = settings.temperature > 0
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_k": 0, "top_p": 1.0} \
        if sampled else {"do_sample": False}
    torch.manual_seed(seed)
    with torch.no_grad(), target.unwrapped() as model:
        out = model.generate(
            input_ids.to(target.device),
            attention_mask=attention.to(target.device),
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=sorted(set(target.eos_token_ids)),
            pad_token_id=pad,
            **sampling,
            **kwargs,
        )
    return [clean_answer(target, row) for row in out[:, length:].tolist()]


def clean_answer(target: TargetAdapter, tokens: list[int]) -> list[int]:
    """`tokens` up to and with the first EOS, and before any visual placeholder token (a model
    may emit one; in a prompt it would stand for video features that do not exist)."""
    eos = set(target.eos_token_ids)
    placeholders = {target.video_token_id(), getattr(target.config, "image_token_id", None),
                    getattr(target.config, "image_token_index", None)}
    answer = []
    for token in tokens:
        if token in placeholders:
            break
        answer.append(token)
        if token in eos:
            break
    return answer


def _sample_states(target: TargetAdapter, ids: torch.Tensor, answer: list[int], video,
                   mid_layer: int) -> dict[str, torch.Tensor]:
    """One sample's tensors (module docstring) from a teacher-forced prefill of prompt + answer."""
    full = torch.cat([ids, torch.tensor(answer, dtype=ids.dtype)])
    out = target.prefill(full, video, layers=(0, mid_layer))
    visual = out.visual_mask.cpu()
    loss_mask = torch.zeros(full.shape[0], dtype=torch.bool)
    loss_mask[ids.shape[0]:] = True
    return {
        "input_ids": full.to(torch.int32),
        "loss_mask": loss_mask,
        "visual_mask": visual,
        "last": out.hidden.detach().cpu().to(torch.float16),
        "mid": out.layer_hidden[mid_layer][visual.to(out.hidden.device)].cpu().to(torch.float16),
        "embed": out.layer_hidden[0][visual.to(out.hidden.device)].cpu().to(torch.float16),
    }


def _write_shard(path: Path, samples: list[dict], indices: list[int]) -> None:
    from safetensors.torch import save_file

    tensors = {key: torch.cat([s[key] for s in samples]) for key in samples[0]}
    lengths = torch.tensor([s["input_ids"].shape[0] for s in samples])
    visual = torch.tensor([s["mid"].shape[0] for s in samples])
    tensors["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    tensors["visual_offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), visual.cumsum(0)])
    tensors["prompt_index"] = torch.tensor(indices, dtype=torch.long)
    tmp = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def shard_name(batch: int) -> str:
    return f"shard-{batch:05d}.safetensors"


def datagen(target: TargetAdapter, prompts: list[Prompt], out: str | Path,
            settings: DatagenSettings = DatagenSettings()) -> dict:
    """Answer `prompts` with `target` and write the training data to `out` (module docstring).
    Resumes a run that `out` already holds. Returns a summary (samples, tokens, bytes, time)."""
    out = Path(out)
    if settings.batch_size < 1 or settings.max_new_tokens < 1:
        raise DataError("--batch-size and --max-new-tokens must be >= 1")
    mid_layer = target.num_layers // 2 if settings.mid_layer is None else settings.mid_layer
    if not 0 <= mid_layer <= target.num_layers:
        raise DataError(f"--mid-layer {mid_layer}: the target has {target.num_layers} layers")
    settings = DatagenSettings(**{**asdict(settings), "mid_layer": mid_layer})
    manifest = {"format": FORMAT, "target": target_fingerprint(target), "settings": asdict(settings)}
    _open_run(out, prompts, manifest)
    batches = batches_of(prompts, settings.batch_size)
    todo = [b for b in range(len(batches)) if not (out / shard_name(b)).is_file()]
    start = time.perf_counter()
    answered = 0
    bar = tqdm(total=len(prompts), initial=len(prompts) - sum(len(batches[b]) for b in todo),
               desc="datagen", unit="answer")
    for b in todo:
        indices = batches[b]
        items = [_inputs(target, prompts[i]) for i in indices]
        answers = _answers(target, items, settings, seed=settings.seed * 1_000_003 + b)
        samples = [_sample_states(target, ids, answer, video, mid_layer)
                   for (ids, video), answer in zip(items, answers, strict=True)]
        _write_shard(out / shard_name(b), samples, indices)
        answered += sum(len(a) for a in answers)
        elapsed = time.perf_counter() - start
        bar.set_postfix(tokens_per_s=f"{answered / elapsed:.1f}", disk=f"{disk_bytes(out) / 2**20:.0f}MiB")
        bar.update(len(indices))
    bar.close()
    summary = summarize(out)
    summary["wall_s_this_run"] = round(time.perf_counter() - start, 1)
    return summary


def restate(target: TargetAdapter, source: str | Path, out: str | Path, mid_layer: int) -> dict:
    """The data in `source` with the visual states after `mid_layer` layers instead of its own
    m* (IVSB studies of m*): the same prompts and answers, each prompt + answer run once more
    through the target, teacher-forced; nothing is generated. Shards and resuming as `datagen`.
    The target must be the one `source` was made with."""
    from safetensors import safe_open

    source, out = Path(source), Path(out)
    if not (source / MANIFEST).is_file():
        raise DataError(f"--from {source}: not a datagen output directory (no {MANIFEST})")
    if source.resolve() == out.resolve():
        raise DataError(f"--from {source} and --out are the same directory; give another --out")
    old = json.loads((source / MANIFEST).read_text())
    if old["target"] != target_fingerprint(target):
        raise DataError(f"--from {source} was made with another target ({old['target']['name']}, "
                        f"weights {old['target']['weights']}); restate it with that target")
    if not 0 <= mid_layer <= target.num_layers:
        raise DataError(f"--mid-layer {mid_layer}: the target has {target.num_layers} layers")
    prompts = _recorded_prompts(source)
    settings = {**old["settings"], "mid_layer": mid_layer}
    _open_run(out, prompts, {"format": FORMAT, "target": old["target"], "settings": settings,
                             "restated_from": str(source)})
    shards = sorted(source.glob("shard-*.safetensors"))
    todo = [path for path in shards if not (out / path.name).is_file()]
    start = time.perf_counter()
    bar = tqdm(total=len(shards), initial=len(shards) - len(todo), desc="restate", unit="shard")
    for path in todo:
        with safe_open(str(path), framework="pt") as f:
            input_ids, offsets = f.get_tensor("input_ids").long(), f.get_tensor("offsets").tolist()
            indices = f.get_tensor("prompt_index").tolist()
        samples = []
        for i, index in enumerate(indices):
            full = input_ids[offsets[i]:offsets[i + 1]]
            ids, video = _inputs(target, prompts[index])
            if not torch.equal(full[:ids.shape[0]], ids.cpu()):
                raise DataError(f"--from {source}: {path.name} sample {i} does not start with its "
                                f"prompt (prompt {index}); the data or the tokenizer changed")
            samples.append(_sample_states(target, ids, full[ids.shape[0]:].tolist(), video, mid_layer))
        _write_shard(out / path.name, samples, indices)
        bar.update(1)
    bar.close()
    summary = summarize(out)
    summary["wall_s_this_run"] = round(time.perf_counter() - start, 1)
    return summary


def _recorded_prompts(directory: Path) -> list[Prompt]:
    """The prompts a datagen run recorded, as it recorded them (video paths as the run was given
    them: absolute, or relative to where it ran; found there, or else beside the data)."""
    prompts = []
    for line in (directory / PROMPTS).read_text().splitlines():
        if not line.strip():
            continue
        prompt = Prompt(**json.loads(line))
        if prompt.video is not None and not Path(prompt.video).is_file():
            beside = directory / prompt.video
            if not beside.is_file():
                raise DataError(f"--from {directory}: video {prompt.video} of its prompts is gone "
                                f"(looked in {Path.cwd()} and {directory}); restate where the data "
                                "was made, or restore the videos")
            prompt = Prompt(**{**prompt.to_dict(), "video": str(beside)})
        prompts.append(prompt)
    return prompts


def disk_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("shard-*.safetensors"))


def summarize(out: Path) -> dict:
    """Samples, tokens and disk use of the shards in `out`."""
    from safetensors import safe_open

    samples = tokens = answer_tokens = visual_tokens = 0
    shards = sorted(out.glob("shard-*.safetensors"))
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            samples += f.get_slice("prompt_index").get_shape()[0]
            tokens += f.get_slice("input_ids").get_shape()[0]
            answer_tokens += int(f.get_tensor("loss_mask").sum())
            visual_tokens += f.get_slice("mid").get_shape()[0]
    return {"shards": len(shards), "samples": samples, "tokens": tokens,
            "answer_tokens": answer_tokens, "visual_tokens": visual_tokens,
            "disk_bytes": disk_bytes(out)}
