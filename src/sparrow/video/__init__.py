"""Video input, from a file to the target's forward arguments.

    io.py          decode with PyAV, sample frames uniformly or at an fps (and write mp4s)
    processing.py  resize / normalize / patchify per family from the checkpoint's own settings
    prompt.py      the chat template with the family's video placeholder tokens, expanded
"""
