"""The native attention kernels (decode and tree): equal to SDPA, used where they apply, lossless
in the loop."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from sparrow.draft import init_draft
from sparrow.runtime import native
from sparrow.runtime.attention import build_attention_mask
from sparrow.speculative.generate import generate
from sparrow.targets import wrap_model
from sparrow.targets.tiny import tiny_model, tiny_tokenizer
from tests.helpers import DEVICE, reference_generate

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="a CPU kernel")


@pytest.fixture(scope="module")
def built():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: the kernel is not built, SDPA is used")
    assert native.library() is not None  # with a compiler, the build must work


def test_a_misspelt_kernel_name_is_an_error_not_a_missing_kernel():
    with pytest.raises(ValueError, match="unknown native kernel 'decode_atention'"):
        native.available("decode_atention")
    assert all(isinstance(native.available(name), bool) for name in native.KERNEL_NAMES)


@pytest.fixture(scope="module")
def decode_kernel(built):
    if not native.available("decode_attention"):
        pytest.skip("the decode kernel needs AVX-512 or AVX2 with FMA: on this CPU decode "
                    "attention stays with SDPA "
                    "(test_decoding_through_the_kernel_equals_generate checks that)")


@pytest.fixture
def tree_kernel(built, monkeypatch):
    if not native.available("tree_attention"):
        pytest.skip("the tree kernel needs AVX-512 or AVX2 with FMA: on this CPU tree attention "
                    "stays with SDPA "
                    "(test_speculative_decoding_through_the_kernels_equals_generate checks that)")
    monkeypatch.setattr(native, "TREE_MIN_LENGTH", {})  # the kernel itself, from MIN_LENGTH keys


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
# 512: the shortest cache the AVX2 build takes; a multiple of 16; a remainder of 3
@pytest.mark.parametrize("length", [512, 2048, 4099])
def test_kernel_equals_sdpa(decode_kernel, kv_heads, groups, dim, length):
    query, key, value = _case(kv_heads, groups, dim, length, capacity=length + 37)
    scale = dim**-0.5
    out = native.decode_attention(query, key, value, scale)
    expected = F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=True)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_scores_far_apart_and_one_dominant_key(decode_kernel):
    query, key, value = _case(2, 6, 64, 3000, capacity=3000)
    key[:, :, 1234] = query.reshape(2, 6, 64)[:, 0] * 3  # one key far ahead of the others
    out = native.decode_attention(query * 4, key, value, 0.125)
    exact = F.scaled_dot_product_attention(*(t.double() for t in (query * 4, key, value)),
                                           scale=0.125, enable_gqa=True)
    sdpa = F.scaled_dot_product_attention(query * 4, key, value, scale=0.125, enable_gqa=True)
    assert (out.double() - exact).abs().max() <= 2 * (sdpa.double() - exact).abs().max() + 1e-7


def test_threads_and_chunks_do_not_change_the_result(decode_kernel):
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


def test_decode_threshold_follows_the_vector_width(decode_kernel, monkeypatch):
    """Below its width's threshold the decode kernel declines (SDPA is faster there), from it
    on it runs; never below MIN_LENGTH, whatever the table says."""
    lanes = native.library().sparrow_lanes
    monkeypatch.setattr(native, "DECODE_MIN_LENGTH", {lanes: 3000})
    assert native.decode_min_length() == 3000
    query, key, value = _case(2, 6, 64, 2999, capacity=3000)
    assert native.decode_attention(query, key, value, 0.1) is None
    query, key, value = _case(2, 6, 64, 3000, capacity=3000)
    assert native.decode_attention(query, key, value, 0.1) is not None
    assert f":{native.decode_min_length()}:" in native.fingerprint()  # autotree costs re-measured
    monkeypatch.setattr(native, "DECODE_MIN_LENGTH", {lanes: 8})
    assert native.decode_min_length() == native.MIN_LENGTH


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_decoding_through_the_kernel_equals_generate(built, family, monkeypatch):
    calls = []
    kernel = native.decode_attention

    def counted(*args, **kwargs):
        out = kernel(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(native, "MIN_LENGTH", 1)  # tiny prompts: let every decode step use it
    monkeypatch.setattr(native, "DECODE_MIN_LENGTH", {})
    monkeypatch.setattr(native, "decode_attention", counted)
    target = wrap_model(tiny_model(family), tiny_tokenizer(family))
    input_ids = torch.randint(0, 90, (1, 40), generator=torch.Generator().manual_seed(5))
    reference = reference_generate(target, input_ids, None, 16, target.eos_token_ids)
    result = generate(target, input_ids, None, method="ar", max_new_tokens=16)
    assert result.token_ids == reference
    # every decode step through the kernel, or, on a CPU without AVX-512, through SDPA
    assert calls and all(used == native.available("decode_attention") for used in calls)


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
    assert "could not build or load the native kernels" in capsys.readouterr().err


# ---- tree attention ----------------------------------------------------------------------


def _tree_case(kv_heads: int, groups: int, dim: int, q: int, masked: int, length: int, seed: int = 0):
    """q new tokens over `length` cached keys (views of a larger cache); visible (q, masked):
    random over the masked keys before the new tokens, causal among the new tokens."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(1, kv_heads * groups, q, dim, generator=g)
    key = torch.randn(1, kv_heads, length + 29, dim, generator=g)[:, :, :length]
    value = torch.randn(1, kv_heads, length + 29, dim, generator=g)[:, :, :length]
    visible = torch.rand(q, masked, generator=g) < 0.5
    visible[:, masked - q:] = torch.ones(q, q, dtype=torch.bool).tril()
    return query, key, value, visible


def _tree_reference(query, key, value, visible, scale, dtype=torch.float32):
    """SDPA over the GQA-packed rows and the additive mask (the path the kernel replaces)."""
    heads, q, dim = query.shape[1:]
    kv_heads, length = key.shape[1], key.shape[2]
    mask = build_attention_mask(visible, length, heads // kv_heads, dtype)
    packed = query.to(dtype).reshape(1, kv_heads, heads // kv_heads * q, dim)
    out = F.scaled_dot_product_attention(packed, key.to(dtype), value.to(dtype), attn_mask=mask,
                                         scale=scale)
    return out.reshape(1, heads, q, dim)


@pytest.mark.parametrize(("kv_heads", "groups", "dim", "q", "masked"), [
    (2, 6, 64, 16, 16),  # the benchmark's shape: a 16-token tree
    (2, 6, 64, 64, 64),  # 384 rows: eight blocks of 48 (AVX2: 24 of 16)
    (3, 3, 64, 7, 12),  # 21 rows (one partial vector), drafted levels before the tree
    (1, 1, 128, 1, 1),  # a single row
    (2, 7, 80, 5, 9),  # an odd group count, head dim 80
    (4, 2, 8, 33, 40),  # the smallest head dim
    (2, 12, 64, 3, 3),  # more query heads per KV head than the decode kernel blocks
    (3, 3, 64, 31, 31),  # the reference target's 30-4-8 verify: 93 rows (AVX2: 5 x 16 + 13)
    # AVX2 blocks of 9-16 rows take the value pass in 6-row groups of 16 dims (then 8): 9, 27
    # (16 + 11), 14 and 12 rows leave groups of 3, 5, 2 and none; head dims 40 and 24 with 9 and
    # 13 rows, an 8-dim slice after 16-dim ones; 10 rows of 128 dims
    (3, 3, 64, 3, 3),
    (1, 9, 64, 3, 3),
    (1, 1, 64, 14, 14),
    (1, 3, 64, 4, 4),
    (3, 3, 40, 3, 3),
    (1, 1, 24, 13, 13),
    (1, 2, 128, 5, 5),
])
@pytest.mark.parametrize("length", [2048, 4099])
def test_tree_kernel_equals_sdpa(tree_kernel, kv_heads, groups, dim, q, masked, length):
    query, key, value, visible = _tree_case(kv_heads, groups, dim, q, masked, length)
    scale = dim**-0.5
    out = native.tree_attention(query, key, value, visible, scale)
    expected = _tree_reference(query, key, value, visible, scale)
    exact = _tree_reference(query, key, value, visible, scale, torch.float64)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert (out.double() - exact).abs().max() <= 2 * (expected.double() - exact).abs().max() + 1e-7


def test_tree_rows_that_see_nothing_of_a_chunk(tree_kernel):
    """Masked spans longer than a chunk: for some rows every key of a chunk is hidden."""
    q, masked = 4, 3 * native.CHUNK
    query, key, value, visible = _tree_case(2, 6, 64, q, masked, 4096, seed=3)
    visible[:, : masked - q] = False
    visible[1, 100] = True  # one visible key in the first hidden chunk, for one row
    out = native.tree_attention(query * 6, key, value, visible, 0.125)  # large scores too
    sdpa = _tree_reference(query * 6, key, value, visible, 0.125)
    exact = _tree_reference(query * 6, key, value, visible, 0.125, torch.float64)
    assert torch.isfinite(out).all()
    assert (out.double() - exact).abs().max() <= 2 * (sdpa.double() - exact).abs().max() + 1e-7


def test_tree_threads_and_chunks_do_not_change_the_result(tree_kernel):
    query, key, value, visible = _tree_case(2, 6, 64, 16, 16, 9000)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(native.tree_attention(query, key, value, visible, 0.125))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-6, atol=1e-7)


def test_tree_falls_back_where_it_does_not_apply(tree_kernel):
    query, key, value, visible = _tree_case(2, 6, 64, 4, 4, 4096)
    assert native.tree_attention(query, key[:, :, :100], value[:, :, :100], visible, 0.1) is None
    assert native.tree_attention(query[..., :20], key[..., :20], value[..., :20], visible,
                                 0.1) is None  # head dim not a multiple of 8
    assert native.tree_attention(query, key, value, visible[:3], 0.1) is None  # 3 rows for 4
    assert native.tree_attention(query.double(), key.double(), value.double(), visible,
                                 0.1) is None
    many = native.MAX_TREE_ROWS // 6 + 1  # a long appended prompt: SDPA's flash kernel instead
    query, key, value, visible = _tree_case(2, 6, 64, many, many, 4096)
    assert native.tree_attention(query, key, value, visible, 0.1) is None


def test_tree_threshold_follows_the_vector_width(tree_kernel, monkeypatch):
    """Below its width's threshold the tree kernel declines (SDPA is faster there), from it on
    it runs."""
    lanes = native.library().sparrow_lanes
    monkeypatch.setattr(native, "TREE_MIN_LENGTH", {lanes: 3000})
    assert native.tree_min_length() == 3000
    query, key, value, visible = _tree_case(2, 6, 64, 4, 4, 2999)
    assert native.tree_attention(query, key, value, visible, 0.1) is None
    query, key, value, visible = _tree_case(2, 6, 64, 4, 4, 3000)
    assert native.tree_attention(query, key, value, visible, 0.1) is not None
    assert f":{native.tree_min_length()}:" in native.fingerprint()  # autotree costs re-measured


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
@pytest.mark.parametrize("mode", ["sparrow", "eagle"])
def test_speculative_decoding_through_the_kernels_equals_generate(built, family, mode, monkeypatch):
    calls = {"tree": [], "decode": []}
    kernels = {"tree": native.tree_attention, "decode": native.decode_attention}

    def counted(name):
        def call(*args, **kwargs):
            out = kernels[name](*args, **kwargs)
            calls[name].append(out is not None)
            return out
        return call

    monkeypatch.setattr(native, "MIN_LENGTH", 1)  # tiny prompts: every step through the kernels
    monkeypatch.setattr(native, "DECODE_MIN_LENGTH", {})
    monkeypatch.setattr(native, "TREE_MIN_LENGTH", {})
    monkeypatch.setattr(native, "tree_attention", counted("tree"))
    monkeypatch.setattr(native, "decode_attention", counted("decode"))
    target = wrap_model(tiny_model(family), tiny_tokenizer(family))
    input_ids = torch.randint(0, 90, (1, 40), generator=torch.Generator().manual_seed(6))
    reference = reference_generate(target, input_ids, None, 24, target.eos_token_ids)
    result = generate(target, input_ids, None, method=mode, draft=init_draft(target, mode),
                      max_new_tokens=24)
    assert result.token_ids == reference
    # tree verifies (and the draft's own trees) through the kernel, or, on a CPU with neither
    # AVX-512 nor AVX2, through SDPA: every call declined
    tree = native.available("tree_attention")
    assert calls["tree"] and all(used == tree for used in calls["tree"])
