"""Draft training: self-distilled data (`datagen`), the recipe (`config`: presets), the
objective (`objective`: IVSB, MTP, soft cross-entropy), and the trainer under accelerate
(`trainer`). Commands: `sparrow datagen`, `sparrow train` (`cli`)."""
