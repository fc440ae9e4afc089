"""Native CPU kernels, compiled on first use with the machine's C compiler.

`decode_attention` is the one-query grouped-query attention of an AR decode step over a long
fp32 cache, `tree_attention` the attention of a tree's q tokens over it (`kernels/attention.c`
says why and how); `linear` is a linear layer applied to a few rows (up to LINEAR_MAX_ROWS),
the weight stream of a decode step or a small verify (`kernels/linear.c`). The C sources ship
with the package; the first call compiles them (`cc -O3 -march=native -fopenmp`) into one
library in `$SPARROW_HOME/kernels/`, named by a hash of the sources, the flags, the compiler
and the CPU's feature flags, so a shared home never hands a library to a machine it was not
built for. The library links the OpenMP runtime
torch has already loaded, so its threads are torch's.

Without a compiler (or with SPARROW_NATIVE=0) nothing is built and callers fall back to
torch's kernels: the functions return None. Each kernel is also built only where it beats
torch's (`available`): every kernel with AVX-512 or AVX2 with FMA, each ISA with its own register
blocking; elsewhere torch's kernels run. From how many cached tokens the attention kernels take
over (`DECODE_MIN_LENGTH` and `TREE_MIN_LENGTH`, by vector width) is measured by
benchmarks/attention_kernels.py (docs/runtime.md).

What is left of a CPU decode step besides these kernels is the model's own eager Python and
small ops. The language model is not compiled with torch.compile: with these kernels
registered as `torch.library.custom_op`s, each call goes through the dispatcher into Python,
and a decode step makes enough of them that this costs more than fusing the small ops saves
(docs/runtime.md).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

KERNELS = Path(__file__).parent / "kernels"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
MIN_LENGTH = 512  # no attention kernel below: there the native call costs more than SDPA's work
CHUNK = 512  # keys per work item at most: fp32 sums over at most 512 terms before the merge
# Query rows per KV head (query heads per KV head x new tokens) above which tree attention leaves
# the work to SDPA: each work item keeps every row's partial result, and long appended prompts
# are better served by SDPA's own flash kernel than by (chunks x rows) partial states.
MAX_TREE_ROWS = 1024
# Cached tokens from which each attention kernel runs natively, by the kernels' vector width
# (shorter caches keep SDPA; measured by benchmarks/attention_kernels.py, docs/runtime.md): the
# 8-lane (AVX2) decode kernel beats SDPA from 512 keys, the 8-lane tree kernel from 4k; the
# 16-lane (AVX-512) thresholds were measured at 2k-4k.
DECODE_MIN_LENGTH = {16: 2048, 8: 512}
TREE_MIN_LENGTH = {16: 2048, 8: 4096}
# Input rows up to which `linear` streams the weights itself (the kernel takes up to 64); more
# rows go to oneDNN's packed kernel, where the FMAs rather than the weight stream set the pace
# (the crossover, measured by benchmarks/linear_rows.py: docs/runtime.md).
LINEAR_MAX_ROWS = 32


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


KERNEL_NAMES = ("decode_attention", "tree_attention", "linear_rows")


def _build_key(compiler_version: str) -> str:
    texts = [path.read_text() for path in sorted(KERNELS.glob("*.[ch]"))]
    return hashlib.sha256("\n".join([*texts, " ".join(FLAGS), compiler_version, _cpu_flags()])
                          .encode()).hexdigest()[:16]


def fingerprint() -> str:
    """What decides which kernels a step runs here: the library's build key (sources, flags,
    compiler, CPU) and the thresholds above, or "torch" without a library. Measured step costs
    are stored under it (`speculative.autotree`), so new kernels are measured anew."""
    lib = library()
    if lib is None:
        return "torch"
    return (f"{lib.sparrow_build}:{decode_min_length()}:{tree_min_length()}:{MAX_TREE_ROWS}:"
            f"{LINEAR_MAX_ROWS}")


def _min_length(thresholds: dict[int, int]) -> int:
    lib = library()
    return MIN_LENGTH if lib is None else max(MIN_LENGTH, thresholds.get(lib.sparrow_lanes, MIN_LENGTH))


def decode_min_length() -> int:
    """Cached tokens from which `decode_attention` runs the native kernel on this machine."""
    return _min_length(DECODE_MIN_LENGTH)


def tree_min_length() -> int:
    """Cached tokens from which `tree_attention` runs the native kernel on this machine."""
    return _min_length(TREE_MIN_LENGTH)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (no compiler, a failed build, SPARROW_NATIVE=0)."""
    if os.environ.get("SPARROW_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    from sparrow.home import cache_home

    sources = sorted(KERNELS.glob("*.c"))
    target = cache_home() / "kernels" / f"sparrow-{_build_key(version)}.so"
    try:
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
                built = Path(scratch) / target.name
                result = subprocess.run(
                    [compiler, *FLAGS, f"-I{KERNELS}", *map(str, sources), "-o", str(built), "-lm"],
                    capture_output=True, text=True, timeout=120)
                if result.returncode != 0:
                    raise OSError(result.stderr.strip()[:500])
                os.replace(built, target)  # atomic: a concurrent build publishes the same bytes
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        print(f"sparrow: could not build or load the native kernels ({compiler}, {target}): "
              f"{error}; using torch's attention instead", file=sys.stderr)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p  # pointers pass as data_ptr() integers
    lib.decode_attention.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64,
                                     i64, ctypes.c_float, i64, ctypes.c_int]
    lib.decode_attention.restype = ctypes.c_int
    lib.decode_attention_available.restype = ctypes.c_int
    lib.tree_attention.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64,
                                   i64, i64, i64, i64, i64, ctypes.c_float, i64, ctypes.c_int]
    lib.tree_attention.restype = ctypes.c_int
    lib.tree_attention_available.restype = ctypes.c_int
    lib.linear_rows.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, ctypes.c_int]
    lib.linear_rows.restype = ctypes.c_int
    lib.linear_rows_available.restype = ctypes.c_int
    # asked once here: `available` runs on every kernel call (each linear of a decode step)
    lib.attention_lanes.restype = ctypes.c_int
    lib.sparrow_lanes = lib.attention_lanes()  # vector width: 16 (AVX-512), 8 (AVX2) or 1
    lib.sparrow_build = target.stem  # the build key, for `fingerprint`
    lib.sparrow_available = frozenset(
        kernel for kernel in KERNEL_NAMES if getattr(lib, f"{kernel}_available")())
    return lib


def available(kernel: str) -> bool:
    """Whether `kernel` ("decode_attention", "tree_attention" or "linear_rows") is built for this
    CPU (AVX-512 or AVX2 with FMA); where not, its
    function returns None and callers keep torch's kernels."""
    if kernel not in KERNEL_NAMES:  # a misspelt name must not read as "not built here"
        raise ValueError(f"unknown native kernel {kernel!r}; one of {', '.join(KERNEL_NAMES)}")
    lib = library()
    return lib is not None and kernel in lib.sparrow_available


def _applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """The kernels' common conditions: one sequence of fp32 CPU tensors without autograd, rows
    of keys and values contiguous, a whole number of query heads per KV head (the length each
    kernel needs is its own threshold: `decode_min_length`, `tree_min_length`)."""
    return (query.shape[0] == 1 and query.device.type == "cpu"
            and all(t.dtype == torch.float32 for t in (query, key, value))
            and key.stride(-1) == 1 and value.stride(-1) == 1 and query.shape[1] % key.shape[1] == 0
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))))


def _call(name: str, function, args):
    if torch.autograd._profiler_enabled():  # named in profiles; no marker cost otherwise
        with torch.profiler.record_function(f"sparrow::native_{name}"):
            return function(*args)
    return function(*args)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     scale: float) -> torch.Tensor | None:
    """softmax(q K^T * scale) V for one new token; None where the kernel does not apply.

    query (1, H, 1, D); key, value (1, H_kv, T, D) with unit stride along D (views of the cache
    are fine); fp32 on the CPU, no autograd. Returns (1, H, 1, D).
    """
    _, heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    if (q_len != 1 or length < decode_min_length() or not _applies(query, key, value)
            or not available("decode_attention")):
        return None
    lib = library()
    q = query.reshape(heads, dim).contiguous()
    out = torch.empty(heads, dim, dtype=torch.float32)
    threads = torch.get_num_threads()
    chunks = max(-(-threads // kv_heads), -(-length // CHUNK))
    args = (q.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), kv_heads,
            heads // kv_heads, dim, length, key.stride(1), key.stride(2), value.stride(1),
            value.stride(2), scale, chunks, threads)
    if _call("decode_attention", lib.decode_attention, args) != 0:
        return None
    return out.reshape(1, heads, 1, dim)


def tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   visible: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Attention of q new tokens (the last q of the cache) over the cache; None where the kernel
    does not apply.

    query (1, H, q, D); key, value (1, H_kv, T, D) as for `decode_attention`; visible (q, m)
    bool over the last m cache positions (see `attention.TreeMask`): every earlier position is
    visible to all q. D a multiple of 8. Returns (1, H, q, D).
    """
    _, heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    masked = visible.shape[1]
    if (dim % 8 or visible.shape[0] != q_len or masked > length or length < tree_min_length()
            or heads // key.shape[1] * q_len > MAX_TREE_ROWS or not _applies(query, key, value)):
        return None
    if not available("tree_attention"):
        return None
    lib = library()
    rows = heads // kv_heads * q_len
    q = query.reshape(kv_heads, rows, dim).contiguous()  # row g * q + i: head g, token i
    mask = visible.to(device="cpu", dtype=torch.uint8).contiguous()
    out = torch.empty(kv_heads, rows, dim, dtype=torch.float32)
    threads = torch.get_num_threads()
    chunks = max(-(-threads // kv_heads), -(-length // CHUNK))
    args = (q.data_ptr(), key.data_ptr(), value.data_ptr(), mask.data_ptr(), out.data_ptr(),
            kv_heads, rows, q_len, dim, length, masked, key.stride(1), key.stride(2),
            value.stride(1), value.stride(2), scale, chunks, threads)
    if _call("tree_attention", lib.tree_attention, args) != 0:
        return None
    return out.reshape(1, heads, q_len, dim)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """`F.linear(x, weight, bias)` for x holding at most LINEAR_MAX_ROWS rows (shape (..., in));
    None where the kernel does not apply (fp32 CPU tensors without autograd, weight rows
    contiguous, x and bias contiguous, few enough rows) or is not built for this CPU
    (`available`)."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    if (x.shape[-1] != in_features or not 1 <= rows <= LINEAR_MAX_ROWS or x.device.type != "cpu"
            or weight.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32 or weight.stride(1) != 1 or not x.is_contiguous()
            or bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous())
            or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                            or bias is not None and bias.requires_grad)):
        return None
    if not available("linear_rows"):
        return None
    y = torch.empty(*x.shape[:-1], out_features, dtype=torch.float32)
    _call("linear", library().linear_rows, (x.data_ptr(), rows, weight.data_ptr(), weight.stride(0),
                                      None if bias is None else bias.data_ptr(), y.data_ptr(),
                                      out_features, in_features, torch.get_num_threads()))
    return y
