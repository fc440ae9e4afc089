"""The speculative decoding algorithm: one loop for plain and speculative decoding.

    generate.py   the loop: prefill, then propose / verify / accept / commit until done
    proposers.py  what the loop asks for a tree each round (no draft = plain decoding)
    tree.py       tree specs (total-depth-top_k), EAGLE-2 node selection, ancestor masks
    accept.py     lossless acceptance, greedy and sampled (terminology: tau, bonus token)
    sampling.py   sampling settings and the target's warped distribution
"""
