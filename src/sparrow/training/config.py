"""What a draft's training is: `TrainConfig`, and the presets `sparrow train --preset` names.

The three parts of METHOD.md section 2 are three options:

    visual   what visual positions carry in training (sparrow.draft.modes): none | last |
             mid (IVSB, the target's states after `mid_layer` layers, default L/2) | embed (MSD)
    mode     what the draft sees at inference: sparrow (text only, VATA) | eagle (every
             position, carrying what `visual` says)
    mtp      passes of multi-token prediction: pass j + 1 feeds the draft its own outputs of
             pass j in place of the target's states at text positions (1 = no MTP)

Every preset shares the rest of the recipe (data, loss, schedule), so the baselines differ
from Sparrow only where the method does:

    sparrow              mid    sparrow  2      the method (MTP + IVSB + VATA)
    eagle                last   eagle    2      EAGLE-full: an EAGLE draft that sees the video
    msd                  embed  eagle    2      MSD-like: raw visual embeddings, sees the video
    hivis                none   sparrow  2      HiViS-like: video hidden in training too
    ablation-none        embed  eagle    1      METHOD.md ablation row  -  -  -  (MTP IVSB VATA)
    ablation-vata        embed  sparrow  1                              -  -  +
    ablation-mtp-vata    embed  sparrow  2                              +  -  +
    ablation-mtp-ivsb    mid    eagle    2                              +  +  -
(the row + + + is `sparrow`). Without IVSB the visual positions carry the raw embeddings
(what IVSB replaces, METHOD.md section 2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from sparrow.draft.modes import check_mode, check_visual
from sparrow.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "sparrow"
    visual: str = "mid"
    mode: str = "sparrow"
    mid_layer: int | None = None  # None: L // 2
    mtp: int = 2
    mtp_weights: tuple[float, ...] | None = None  # per pass; None: 1.0 each (losses summed)
    feature_weight: float = 0.0  # SmoothL1 between the draft's outputs and the target's states
    noise: float = 0.05  # uniform noise U(-noise, noise) on the target states fed in
    draft_vocab: int | None = 32768  # N most frequent answer tokens (None: the whole vocabulary)
    lr: float = 5e-4
    warmup: float = 0.05  # fraction of the steps with a linear warm-up, then linear decay
    epochs: float = 4.0  # over all the data (stage 2)
    stage1_epochs: float = 1.0  # over the text-only samples first (stage 1; 0 to skip)
    batch_size: int = 16  # global: split over processes
    grad_clip: float = 0.5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    seed: int = 0
    held_out: float = 0.05  # fraction of samples kept out of training for held-out tau
    max_samples: int | None = None  # train on N of the training samples (data-size studies; data.subset)
    eval_depth: int = 5  # chain depth of the held-out tau
    eval_every: int = 50  # steps
    checkpoint_every: int = 50  # steps
    init: str = "random"  # random | target (the decoder layer starts as the target's last one)
    extra: dict = field(default_factory=dict)  # unused; keeps configs of newer versions readable

    def __post_init__(self):
        check_visual(self.visual)
        check_mode(self.mode)
        if self.visual == "none" and self.mode == "eagle":
            raise ConfigError("--visual none hides the video in training; it runs in --mode sparrow")
        if self.mtp < 1:
            raise ConfigError(f"--mtp {self.mtp}: at least 1 pass")
        if self.mtp_weights is not None and len(self.mtp_weights) != self.mtp:
            raise ConfigError(f"--mtp-weights gives {len(self.mtp_weights)} weights for {self.mtp} passes")
        if self.batch_size < 1 or self.lr <= 0 or self.epochs < 0 or self.stage1_epochs < 0:
            raise ConfigError("--batch-size, --lr must be positive and --epochs >= 0")
        if self.draft_vocab is not None and self.draft_vocab < 2:
            raise ConfigError(f"--draft-vocab {self.draft_vocab}: at least 2 tokens")
        if self.init not in ("random", "target"):
            raise ConfigError(f"--init {self.init!r}: random or target")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"--max-samples {self.max_samples}: at least 1")
        if not 0 <= self.held_out < 1:
            raise ConfigError(f"--held-out {self.held_out}: a fraction in [0, 1)")

    @property
    def pass_weights(self) -> tuple[float, ...]:
        return self.mtp_weights or (1.0,) * self.mtp

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("mtp_weights", "betas"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


PRESETS: dict[str, dict] = {
    "sparrow": {"visual": "mid", "mode": "sparrow", "mtp": 2},
    "eagle": {"visual": "last", "mode": "eagle", "mtp": 2},
    "msd": {"visual": "embed", "mode": "eagle", "mtp": 2},
    "hivis": {"visual": "none", "mode": "sparrow", "mtp": 2},
    "ablation-none": {"visual": "embed", "mode": "eagle", "mtp": 1},
    "ablation-vata": {"visual": "embed", "mode": "sparrow", "mtp": 1},
    "ablation-mtp-vata": {"visual": "embed", "mode": "sparrow", "mtp": 2},
    "ablation-mtp-ivsb": {"visual": "mid", "mode": "eagle", "mtp": 2},
}


def preset(name: str, **overrides) -> TrainConfig:
    """The preset `name` with `overrides` (None values are ignored) applied."""
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} unknown; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return replace(TrainConfig(preset=name), **values)
