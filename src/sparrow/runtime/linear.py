"""Prepacked oneDNN linears for CPU inference.

On CPU, torch runs an fp32 `nn.Linear` through MKL. On this project's machines (AMD EPYC,
AVX-512) MKL takes a slow path: one decode step's weight stream (M = 1) moved 12.6 GB/s
against 30 GB/s for a plain `sum` over the same bytes, and M = 16 (a verify) reached half of
oneDNN's GFLOP/s. oneDNN picks its kernels by instruction set, not by vendor; with the weight
reordered once into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what
torch.compile's CPU backend does when it freezes a model) the same linears of a 120M
Qwen2-shaped model took (2 threads, ms per pass over every linear but lm_head):

    rows M        1     16     32     64    512   2048
    MKL         21.2   33.0   57.3   92.0   548   2049
    oneDNN      12.7   17.4   26.9   48.0   381   1477

(`benchmarks/verify_cost.py` measures whole steps both ways.) Results agree with MKL to fp32
rounding (max relative difference ~1e-6), so this is a kernel choice, like the attention
implementation: the model's modules, parameters and `state_dict` are unchanged, and the model
class is not touched.

`pack_linears(model)` gives each CPU fp32 `nn.Linear` its packed weight and routes the
module's forward through it when it is safe: fp32 input and weight on CPU, and no autograd
needed. Anything else (training, another device or dtype) takes `F.linear` as before.
If the weight changes after packing (in place, or replaced), it is packed again on next use.
The packed copy costs as much memory as the weights it covers.

One input row (an AR decode step, M = 1) goes to `native.linear` instead, a plain C pass over
the weight's own rows: there oneDNN streamed the weights at 14-41 GB/s per shape, the C pass
at 47-60 GB/s (2 threads; `benchmarks/verify_cost.py`). A model that only decodes never packs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparrow.runtime import native

PACK_ROWS = 16  # the rows per call oneDNN chooses its layout for (measured best from 1 to 2048)


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
        if x.numel() == x.shape[-1]:  # one row: the weight stream of a decode step
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
