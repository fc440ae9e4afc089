"""The native decode-attention kernel: equal to SDPA, used where it applies, lossless in the loop."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, reference_generate
from sparrow.decoding import native
from sparrow.decoding.generate import generate
from sparrow.targets import wrap_model
from sparrow.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="a CPU kernel")


@pytest.fixture(scope="module")
def built():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: the kernel is not built, SDPA is used")
    assert native.library() is not None  # with a compiler, the build must work


def _case(kv_heads: int, groups: int, dim: int, length: int, capacity: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(1, kv_heads * groups, 1, dim, generator=g)
    key = torch.randn(1, kv_heads, capacity, dim, generator=g)[:, :, :length]  # cache views
    value = torch.randn(1, kv_heads, capacity, dim, generator=g)[:, :, :length]
    return query, key, value


@pytest.mark.parametrize(("kv_heads", "groups", "dim"), [
    (2, 6, 64), (3, 3, 64), (1, 1, 64), (4, 8, 64), (2, 7, 64),  # head dim 64: register-blocked
    (2, 4, 128), (2, 3, 16),  # other multiples of 16: the vectorized generic path
    (3, 2, 40), (2, 12, 64),  # neither (or too many groups for the blocked path): scalar loops
])
@pytest.mark.parametrize("length", [2048, 4099])  # a multiple of 16, and a remainder of 3
def test_kernel_equals_sdpa(built, kv_heads, groups, dim, length):
    query, key, value = _case(kv_heads, groups, dim, length, capacity=length + 37)
    scale = dim**-0.5
    out = native.decode_attention(query, key, value, scale)
    expected = F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=True)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_scores_far_apart_and_one_dominant_key(built):
    query, key, value = _case(2, 6, 64, 3000, capacity=3000)
    key[:, :, 1234] = query.reshape(2, 6, 64)[:, 0] * 3  # one key far ahead of the others
    out = native.decode_attention(query * 4, key, value, 0.125)
    exact = F.scaled_dot_product_attention(*(t.double() for t in (query * 4, key, value)),
                                           scale=0.125, enable_gqa=True)
    sdpa = F.scaled_dot_product_attention(query * 4, key, value, scale=0.125, enable_gqa=True)
    assert (out.double() - exact).abs().max() <= 2 * (sdpa.double() - exact).abs().max() + 1e-7


def test_threads_and_chunks_do_not_change_the_result(built):
    query, key, value = _case(2, 6, 64, 9000, capacity=9100)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(native.decode_attention(query, key, value, 0.125))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-6, atol=1e-7)


def test_falls_back_where_it_does_not_apply(built, monkeypatch):
    query, key, value = _case(2, 6, 64, 4096, capacity=4096)
    assert native.decode_attention(query, key[:, :, :100], value[:, :, :100], 0.125) is None  # short
    assert native.decode_attention(query.double(), key.double(), value.double(), 0.125) is None
    assert native.decode_attention(query.repeat(2, 1, 1, 1), key.repeat(2, 1, 1, 1),
                                   value.repeat(2, 1, 1, 1), 0.125) is None  # batch of two
    assert native.decode_attention(query.requires_grad_(), key, value, 0.125) is None  # autograd
    monkeypatch.setenv("SPARROW_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.decode_attention(query.detach(), key, value, 0.125) is None
    finally:
        monkeypatch.delenv("SPARROW_NATIVE")
        native.library.cache_clear()


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_decoding_through_the_kernel_equals_generate(built, family, monkeypatch):
    calls = []
    kernel = native.decode_attention

    def counted(*args, **kwargs):
        out = kernel(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(native, "MIN_LENGTH", 1)  # tiny prompts: let every decode step use it
    monkeypatch.setattr(native, "decode_attention", counted)
    target = wrap_model(tiny_model(family), tiny_tokenizer(family))
    input_ids = torch.randint(0, 90, (1, 40), generator=torch.Generator().manual_seed(5))
    reference = reference_generate(target, input_ids, None, 16, target.eos_token_ids)
    result = generate(target, input_ids, None, method="ar", max_new_tokens=16)
    assert result.token_ids == reference
    assert calls and all(calls)


def test_an_unwritable_cache_falls_back_with_a_message(built, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.write_text("a file where the cache directory should be")
    monkeypatch.setenv("SPARROW_HOME", str(home))
    native.library.cache_clear()
    try:
        query, key, value = _case(2, 6, 64, 4096, capacity=4096)
        assert native.decode_attention(query, key, value, 0.125) is None
    finally:
        native.library.cache_clear()
    assert "could not build or load the native decode kernel" in capsys.readouterr().err
