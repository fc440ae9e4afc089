"""The runtime layer under every target and draft: how a forward pass runs fast and in place.
It knows nothing of drafting or acceptance (`sparrow.speculative` builds on it, never the
other way round).

    cache.py      the preallocated in-place KV cache (truncate, keep an accepted path)
    attention.py  tree attention registered with transformers (the mask is a forward argument)
    linear.py     oneDNN-packed CPU linears
    native.py     C kernels compiled on first use (split-K attention, one-row linear)
"""
