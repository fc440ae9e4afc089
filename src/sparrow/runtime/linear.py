"""Prepacked oneDNN linears for CPU inference.

On CPU, torch runs an fp32 `nn.Linear` through MKL. On the CPUs this project was measured on,
MKL takes a slow path for the skinny matrices of decoding and verification (one row, or a
tree's few): it streams the weights well below a plain read of them. oneDNN picks its kernels
by instruction set, not by vendor; with the weight reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU backend does when it
freezes a model) its packed kernels ran the linears faster than MKL at every row count
measured, from a decode step's to a prefill's (measurements: docs/runtime.md;
`benchmarks/verify_cost.py` measures whole steps both ways). Results agree with MKL to fp32
rounding, so this is a kernel choice, like the attention implementation: the model's
parameters and `state_dict` are unchanged and its class is not touched; only each linear's
class is switched to `PackedLinear`, which `unpack_linears` switches back (`TargetAdapter.unwrap`
does it for a wrapped model).

`pack_linears(model)` gives each CPU fp32 `nn.Linear` its packed weight and routes the
module's forward through it when it is safe: fp32 input and weight on CPU, and no autograd
needed. Anything else (training, another device or dtype) takes `F.linear`, as unpacked.
If the weight changes after packing (in place, or replaced), it is packed again on next use.
The packed copy costs as much memory as the weights it covers.

Up to `native.LINEAR_MAX_ROWS` input rows (an AR decode step, M = 1; a verify of a tree of up
to that many tokens) go to `native.linear` instead, a plain C pass over the weight's own rows
that reads each weight tile once for all rows: a step over a few rows is a stream of the
weights, which it moves faster than oneDNN's packed kernel does (docs/runtime.md). A model
that only decodes and verifies such trees never packs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparrow.runtime import native

PACK_ROWS = 16  # the rows per call oneDNN chooses its layout for; the fastest measured (docs/runtime.md)


def available() -> bool:
    """Whether this torch build has oneDNN's packed linear (every CPU build of torch 2.x)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose inference forward uses a oneDNN-packed copy of its weight. Never
    constructed: `pack_linears` switches existing modules to it (`unpack_linears` back)."""

    _packed: torch.Tensor | None
    _packed_from: tuple[int, int]  # (data_ptr, version) of the weight that was packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            x.device.type != "cpu"
            or weight.device.type != "cpu"
            or weight.dtype != torch.float32
            or x.dtype != torch.float32
            or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
        ):
            return F.linear(x, weight, self.bias)
        if x.numel() <= native.LINEAR_MAX_ROWS * x.shape[-1]:  # a decode step, a small verify
            y = native.linear(x, weight, self.bias)
            if y is not None:
                return y
        source = (weight.data_ptr(), weight._version)
        if self._packed is None or self._packed_from != source:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
            self._packed_from = source
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed weight behind (an opaque oneDNN tensor has no
        storage to copy); it is packed again on first use."""
        state = self.__dict__.copy()
        state["_packed"], state["_packed_from"] = None, (0, -1)
        return state


def pack_linears(model: nn.Module) -> int:
    """Switch every fp32 `nn.Linear` of `model` whose weight is on the CPU to `PackedLinear`
    (packed lazily, on its first inference call). Returns how many were switched; 0 where
    oneDNN is missing."""
    if not available():
        return 0
    count = 0
    for module in model.modules():
        if (
            type(module) is nn.Linear
            and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32
        ):
            module.__class__ = PackedLinear
            module._packed, module._packed_from = None, (0, -1)
            count += 1
    return count


def unpack_linears(model: nn.Module) -> int:
    """Undo `pack_linears` (frees the packed copies). Returns how many were switched back."""
    count = 0
    for module in model.modules():
        if type(module) is PackedLinear:
            module.__class__ = nn.Linear
            del module._packed, module._packed_from
            count += 1
    return count
