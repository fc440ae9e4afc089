"""The reference target's eyes trainer: `python -m sparrow.reference.train RUN_DIR ...`.

It trains the fixture's own weights (the tower, projector, image newline and SmolLM2 LoRA
factors from which `sparrow.reference.assembly` builds the reference target) on synthetic
videos. It belongs to the fixture and is not the draft trainer: training drafts for speculative
decoding is the core's business and will live in `sparrow.training`.

    data.py         the eyes and align stages' corpus shards, labels and training conversations
    model.py        the model the language-model stages train (LoRA), precision, the shipped file
    checkpoints.py  atomic checkpoints, stage logs, sittings (`--continue-from`)
    eyes.py         stage 1: the vision tower on the ground truth
    align.py        stage 1b: the projector onto SmolLM2's word embeddings
    long.py         stage 2b's own parts: PoSE positions, the frozen-prefix step
    batches.py      the language-model stages' batches (conversations, frame draws, positions)
    caption.py      stage 2 (and 2b's loop): the language-model training loop and its check
    cli.py          the command: arguments and the order of the stages (`main`)
    __main__.py     `python -m sparrow.reference.train`

Each module imports only modules above it in this list.
"""
