"""The CPU linears (`sparrow.runtime.linear`: oneDNN-packed; one row through the native kernel):
same results as `F.linear`, a safe fallback wherever they do not apply, and a fresh pack when
the weight changes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparrow.runtime import native
from sparrow.runtime.linear import PackedLinear, available, pack_linears, unpack_linears
from sparrow.targets import load_target

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no oneDNN")


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 40), nn.GELU(), nn.Linear(40, 24, bias=False))


def reference_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    first, last = model[0], model[2]
    return F.linear(F.gelu(F.linear(x, first.weight, first.bias)), last.weight)


@pytest.mark.parametrize("shape", [(1, 48), (2, 4, 48), (16, 48), (3, 7, 48), (300, 48)])
def test_packed_forward_equals_f_linear(shape):
    model = small_model()
    x = torch.randn(*shape)
    assert pack_linears(model) == 2
    assert type(model[0]) is PackedLinear and isinstance(model[0], nn.Linear)
    with torch.no_grad():
        out = model(x)
    if x.numel() <= native.LINEAR_MAX_ROWS * shape[-1] and native.available("linear_rows"):
        assert model[0]._packed is None  # a few rows: the native kernel ran, nothing packed
    else:
        assert model[0]._packed is not None  # the packed kernel ran, not the fallback
    torch.testing.assert_close(out, reference_output(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("out_features", "in_features"), [
    (768, 768), (128, 768), (48, 2048), (37, 53), (5, 19), (16, 16), (1, 1), (24, 1100)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_native_row_kernel_equals_f_linear(out_features, in_features, bias, rows):
    """Every row as exact as torch's kernels, and each row's result the same whether it comes
    alone or with others (the summation order does not depend on the row count)."""
    if not native.available("linear_rows"):
        pytest.skip("no C compiler or neither AVX-512 nor AVX2: the row kernel is not used here "
                    "(see the next test)")
    g = torch.Generator().manual_seed(out_features + in_features)
    storage = torch.randn(out_features, in_features + 3, generator=g)
    weight = storage[:, :in_features]  # rows of a larger buffer: a row stride > in_features
    b = torch.randn(out_features, generator=g) if bias else None
    x = torch.randn(1, rows, in_features, generator=g)
    out = native.linear(x, weight, b)
    assert out.shape == (1, rows, out_features)
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-4)  # fp32 sums of up to 2,048 terms
    torch_error = (F.linear(x, weight, b).double() - exact).abs().max()
    assert (out.double() - exact).abs().max() <= 2 * torch_error + 1e-6  # as exact as torch's kernels
    for row in range(rows):
        assert torch.equal(native.linear(x[:, row:row + 1].contiguous(), weight, b), out[:, row:row + 1])


def test_native_row_kernel_declines_what_it_does_not_handle():
    weight, x = torch.randn(8, 16), torch.randn(1, 16)
    assert native.linear(torch.randn(native.LINEAR_MAX_ROWS + 1, 16), weight, None) is None  # too many rows
    assert native.linear(x.double(), weight.double(), None) is None
    assert native.linear(x, weight.t().contiguous().t(), None) is None  # columns not contiguous
    assert native.linear(x, weight.requires_grad_(), None) is None  # autograd
    if not native.available("linear_rows"):  # no compiler, or neither AVX-512 nor AVX2: torch's kernels
        assert native.linear(x, weight.detach(), None) is None


def test_non_contiguous_input():
    model = small_model()
    pack_linears(model)
    x = torch.randn(48, 5).t()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_output(model, x), rtol=1e-5, atol=1e-5)


def test_autograd_and_other_dtypes_fall_back():
    model = small_model()
    pack_linears(model)
    x = torch.randn(4, 48)
    out = model(x)  # grad enabled, weights require grad: plain F.linear
    out.sum().backward()
    assert model[0].weight.grad is not None and model[0]._packed is None
    with torch.no_grad():
        half = model.to(torch.bfloat16)(x.to(torch.bfloat16))  # weight no longer fp32
    assert half.dtype == torch.bfloat16 and model[0]._packed is None


def test_weight_changes_are_seen():
    model = small_model()
    pack_linears(model)
    x = torch.randn(4, 48)
    with torch.inference_mode():
        before = model(x)
    with torch.no_grad():
        model[0].weight.mul_(2)  # in place: the version counter moves
        changed = model(x)
        torch.testing.assert_close(changed, reference_output(model, x), rtol=1e-5, atol=1e-5)
        model.load_state_dict(small_model().state_dict())  # copies in place again
        restored = model(x)
    assert not torch.allclose(before, changed)
    torch.testing.assert_close(restored, before, rtol=1e-6, atol=1e-6)
    model[0].weight = nn.Parameter(torch.zeros(40, 48))  # replaced: the data pointer moves
    with torch.no_grad():
        replaced = model(x)
    torch.testing.assert_close(replaced, reference_output(model, x), rtol=1e-5, atol=1e-5)


def test_state_dict_copy_and_unpack_are_unchanged():
    model = small_model()
    keys = list(model.state_dict())
    pack_linears(model)
    with torch.no_grad():
        model(torch.randn(2, 48))
    assert list(model.state_dict()) == keys
    clone = copy.deepcopy(model)
    assert type(clone[0]) is PackedLinear
    assert unpack_linears(model) == 2
    assert type(model[0]) is nn.Linear and not hasattr(model[0], "_packed")


def test_target_adapters_pack_their_linears():
    target = load_target("tiny:qwen2_5_vl")
    linears = [m for m in target.model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is PackedLinear for m in linears)
