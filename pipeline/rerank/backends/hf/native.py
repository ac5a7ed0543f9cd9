"""The padded plan's native CPU attention op (``csrc/attention.cpp``): built once per machine with the
C++ compiler inductor uses, cached on disk beside inductor's kernels, loaded as
``torch.ops.winnow.attend``. torch is imported lazily.

Why a C++ op: torch has no bf16 GEMM with an fp32 output on a CPU, so the bf16 engine upcast q and k
and ran the attention scores GEMM in fp32 on MKL (~155 GFLOPS on the 2-core Zen 5 of
docs/benchmarks.md; fp32 ran both GEMMs there); the op runs both GEMMs on oneDNN's brgemm
micro-kernel (bf16 ~370) with the scale, mask and softmax in between while a tile is in cache.
Anything missing (no compiler, an ISA without the kernels, a build or probe error) leaves the torch
path in place for that dtype, with the reason logged.
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "attention.cpp"
KEY_TILE = 64  # keys per tile of the packed keys and values (csrc/attention.cpp kKeys)
ROW_TILE = 16  # queries per task (kRows): fewer (the last layer's one) run the torch path
BUILD_TIMEOUT_S = 300
# ATen's vectorized math is compiled per ISA: the flags inductor uses for the same capability.
ISA_FLAGS = {
    "AVX512": [
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
        "-mavx512f",
        "-mavx512dq",
        "-mavx512vl",
        "-mavx512bw",
        "-mfma",
    ],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


def cache_dir() -> Path:
    """``$TORCHINDUCTOR_CACHE_DIR/winnow``, else inductor's default root (``/tmp/torchinductor_<user>``)."""
    root = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not root:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid())
        root = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    return Path(root) / "winnow"


def _compiler() -> str | None:
    return next((cc for cc in ("g++", "c++", "clang++") if shutil.which(cc)), None)


def _command(cc: str, isa: list[str], out: Path) -> list[str]:
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = library_paths()
    return [
        cc,
        "-O3",
        "-shared",
        "-fPIC",
        "-std=c++20",
        "-fopenmp",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *isa,
        *(f"-I{p}" for p in include_paths()),
        str(SOURCE),
        *(f"-L{p}" for p in libs),
        *(f"-Wl,-rpath,{p}" for p in libs),
        "-lc10",
        "-ltorch_cpu",
        "-ltorch",
        "-o",
        str(out),
    ]


def build(cc: str, isa: list[str]) -> Path:
    """The op's shared library for this source, torch, compiler and ISA: from the cache, else
    compiled (~10 s) into it (a temporary name, then an atomic rename: concurrent builders agree)."""
    import torch

    digest = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        torch.__version__.encode(),
        cc.encode(),
        *map(str.encode, isa),
    ):
        digest.update(part)
    folder = cache_dir()
    target = folder / f"attention-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{target.stem}-{os.getpid()}.so"
    try:
        subprocess.run(
            _command(cc, isa, tmp),
            check=True,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def start_build() -> Future[Path] | None:
    """The op's library compiled in the background, for an engine to overlap the ~10 s first build
    with its model's load (the compiler is a subprocess, on another core); :func:`dtypes` then finds
    it on disk. None where it is loaded already or cannot be built here (dtypes says why)."""
    if _loaded():
        return None
    cc, isa = _toolchain()
    if isa is None or cc is None:
        return None
    pool = ThreadPoolExecutor(1, thread_name_prefix="winnow-build")
    future = pool.submit(build, cc, isa)
    pool.shutdown(wait=False)
    return future


def _loaded() -> bool:
    import torch

    return hasattr(torch.ops.winnow, "attend")


def _toolchain() -> tuple[str | None, list[str] | None]:
    """(the C++ compiler, the ISA flags for this CPU); None for what is missing."""
    import torch

    return _compiler(), ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability())


@functools.cache
def dtypes() -> frozenset[str]:
    """The dtypes (``"bfloat16"``, ``"float32"``) ``torch.ops.winnow.attend`` is loaded for and gave
    the torch path's numbers on a probe (once per process; empty where it did not build or load)."""
    import torch

    if not _loaded():
        cc, isa = _toolchain()
        if isa is None or cc is None:
            log.info("native attention unavailable: %s", "no C++ compiler" if isa else "CPU ISA")
            return frozenset()
        try:
            torch.ops.load_library(str(build(cc, isa)))
        except subprocess.CalledProcessError as exc:
            log.warning("native attention: build failed; torch path kept\n%s", exc.stderr[-2000:])
            return frozenset()
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            log.warning("native attention unavailable (%s); torch path kept", exc)
            return frozenset()
    ok = set()
    for dtype in (torch.bfloat16, torch.float32):
        try:
            _probe(dtype)
        except (RuntimeError, AssertionError) as exc:  # e.g. no bf16 brgemm on this CPU
            log.info("native attention unavailable in %s (%s); torch path kept", dtype, exc)
        else:
            ok.add(str(dtype).removeprefix("torch."))
    return frozenset(ok)


def _probe(dtype: Any) -> None:
    """A small attention through the op against the torch path; raises where they differ."""
    import torch

    from pipeline.rerank.backends.hf.attention import grouped_attention

    gen = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, dim, head, tail = 2, 4, 2, 64, 37, 70
    q = torch.randn(rows, heads, tail, dim, generator=gen).to(dtype)
    k = torch.randn(rows, kv_heads, head + tail, dim, generator=gen).to(dtype)
    v = torch.randn(rows, kv_heads, head + tail, dim, generator=gen).to(dtype)
    first, lens = torch.tensor([0, 5]), torch.tensor([tail, tail - 20])  # a left-padded head, pads
    mask = visible_mask(first, tail, head + tail)
    with torch.inference_mode():
        want = grouped_attention(q.double(), k.double(), v.double(), mask)
        got = native_attention(q, k, v, first, lens)
    want = want.flatten(0, 1)[real_slots(lens, tail)]
    err = float((got.double() - want).abs().max())
    if not err <= (1e-5 if dtype == torch.float32 else 2e-2):
        raise AssertionError(f"native attention probe off by {err}")


def visible_mask(first: Any, q_len: int, k_len: int) -> Any:
    """The boolean mask ``[rows, 1, q_len, k_len]`` the op's ``first`` stands for: row r's query i
    sees keys ``first[r]`` to ``k_len - q_len + i`` (a left-padded head, then causal)."""
    import torch

    keys = torch.arange(k_len)
    horizon = k_len - q_len + torch.arange(q_len)
    return ((keys[None, None, :] >= first[:, None, None]) & (keys <= horizon[:, None])[None])[
        :, None
    ]


def real_slots(lens: Any, width: int) -> Any:
    """The padded slots ``[rows · width]`` of the rows' first ``lens`` queries, in packed order."""
    import torch

    return (torch.arange(width)[None, :] < lens[:, None]).flatten().nonzero().squeeze(1)


def pack(fresh: Any, past: Any = None, *, values: bool) -> Any:
    """``past`` then ``fresh`` (``[rows, kv_heads, n, dim]`` each, any strides with the dim last)
    along the keys, in tiles of 64, zero past the last, in the op's layout (``torch.ops.winnow.pack``,
    one pass): keys ``[rows·kv_heads, tiles, dim/2, 64, 2]`` for bf16 (VNNI pairs along dim), ``[…,
    tiles, dim, 64]`` for fp32; values ``[…, tiles, 32, dim, 2]`` for bf16 (VNNI pairs of consecutive
    keys), ``[…, tiles, 64, dim]`` for fp32."""
    import torch

    if fresh.stride(-1) != 1:
        fresh = fresh.contiguous()
    if past is None:
        past = fresh[:, :, :0]
    elif past.stride(-1) != 1:
        past = past.contiguous()
    rows, kv_heads, n, dim = fresh.shape
    tiles = -(-(past.shape[2] + n) // KEY_TILE)
    shape: tuple[int, ...]
    if fresh.dtype == torch.bfloat16:
        shape = (tiles, KEY_TILE // 2, dim, 2) if values else (tiles, dim // 2, KEY_TILE, 2)
    else:
        shape = (tiles, KEY_TILE, dim) if values else (tiles, dim, KEY_TILE)
    out = fresh.new_empty(rows * kv_heads, *shape)
    torch.ops.winnow.pack(past, fresh, out, values)
    return out


def native_attention(
    query: Any,
    key: Any,
    value: Any,
    first: Any,
    lens: Any,
    scaling: float | None = None,
    past: tuple[Any, Any] | None = None,
) -> Any:
    """:func:`~pipeline.rerank.backends.hf.attention.grouped_attention` in ``torch.ops.winnow.attend``
    for the padded plan's masks (q, k and v all bf16 or all fp32): row r's query i sees keys
    ``first[r]`` (a left-padded head's first real key) to its causal horizon, the last ``q`` keys
    being this forward's (:func:`visible_mask` is the same as a mask). Only each row's first
    ``lens[r]`` queries are real and computed. ``past``: (keys, values) before ``key``/``value``
    along the keys (a cached head), packed with them without a concatenation. Returns the real
    queries packed, ``[sum(lens), heads, dim]``, row after row."""
    import torch

    heads, dim = query.shape[1], query.shape[3]
    scale = scaling if scaling is not None else dim**-0.5
    keys = pack(key, None if past is None else past[0], values=False)
    values = pack(value, None if past is None else past[1], values=True)
    length = key.shape[2] + (0 if past is None else past[0].shape[2])
    first, lens = first.to(torch.long).contiguous(), lens.to(torch.long).contiguous()
    out = value.new_empty(int(lens.sum()), heads, dim)
    torch.ops.winnow.attend(query.contiguous(), keys, values, first, lens, length, out, scale)
    return out
