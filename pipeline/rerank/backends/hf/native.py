"""The padded plan's native CPU attention op (``csrc/attention.cpp``): built once per machine with the
C++ compiler inductor uses, cached on disk beside inductor's kernels, loaded as
``torch.ops.winnow.grouped_probs``. torch is imported lazily.

Why a C++ op: torch has no bf16 GEMM with an fp32 output on a CPU, so the bf16 engine upcast q and k
and ran the attention scores GEMM in fp32 (~155 GFLOPS on the 2-core Zen 5 of docs/benchmarks.md);
the op runs it on oneDNN's bf16 brgemm micro-kernel (~370) and the scale, mask and softmax on each
tile while it is in cache. Anything missing (no compiler, an ISA without the kernels, a build or
probe error) leaves the torch path in place, with the reason logged.
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
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "attention.cpp"
KEY_TILE = 64  # keys per tile of the packed keys (csrc/attention.cpp kKeys)
ROW_TILE = 32  # query rows per task (kRows): the queries buffer is padded to a multiple
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


@functools.cache
def available() -> bool:
    """True once ``torch.ops.winnow.grouped_probs`` is loaded and gave the torch path's numbers on a
    probe (once per process)."""
    import torch

    if hasattr(torch.ops.winnow, "grouped_probs"):
        return True
    isa = ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability())
    cc = _compiler()
    if isa is None or cc is None:
        log.info("native attention unavailable: %s", "no C++ compiler" if isa else "CPU ISA")
        return False
    try:
        torch.ops.load_library(str(build(cc, isa)))
        _probe()
    except subprocess.CalledProcessError as exc:
        log.warning("native attention: build failed; torch path kept\n%s", exc.stderr[-2000:])
        return False
    except (OSError, RuntimeError, AssertionError, subprocess.TimeoutExpired) as exc:
        log.warning("native attention unavailable (%s); torch path kept", exc)
        return False
    return True


def _probe() -> None:
    """A small bf16 attention through the op against the torch path; raises where they differ
    (an ISA whose brgemm is missing raises in the op itself)."""
    import torch

    from pipeline.rerank.backends.hf.attention import grouped_attention

    gen = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, dim, head, tail = 2, 4, 2, 64, 37, 70
    q = torch.randn(rows, heads, tail, dim, generator=gen).bfloat16()
    k = torch.randn(rows, kv_heads, head + tail, dim, generator=gen).bfloat16()
    v = torch.randn(rows, kv_heads, head + tail, dim, generator=gen).bfloat16()
    mask = torch.ones(rows, 1, tail, head + tail, dtype=torch.bool)
    mask[..., head:] = torch.ones(tail, tail, dtype=torch.bool).tril()
    mask[1, ..., :5] = False  # a left-padded head
    with torch.inference_mode():
        want = grouped_attention(q.float(), k.float(), v, mask, chunk=32)
        got = native_attention(q, k, v, mask, chunk=32)
    err = float((got.float() - want.float()).abs().max())
    if not err <= 2e-2:
        raise AssertionError(f"native attention probe off by {err}")


def pack_keys(key: Any) -> Any:
    """``[rows, kv_heads, kv_len, dim]`` → tiles of 64 keys, zero past the last, in the op's B layout:
    ``[rows·kv_heads, tiles, dim/2, 64, 2]`` for bf16 (VNNI pairs), ``[…, tiles, dim, 64]`` for fp32."""
    import torch

    rows, kv_heads, kv_len, dim = key.shape
    tiles = -(-kv_len // KEY_TILE)
    flat = key.new_zeros(rows * kv_heads, tiles * KEY_TILE, dim)
    flat[:, :kv_len] = key.reshape(rows * kv_heads, kv_len, dim)
    if key.dtype == torch.bfloat16:  # a pair of bf16 along dim moves as one 32-bit word
        words = flat.view(torch.int32).view(-1, tiles, KEY_TILE, dim // 2)
        packed = words.transpose(-1, -2).contiguous().view(torch.bfloat16)
        return packed.view(-1, tiles, dim // 2, KEY_TILE, 2)
    return flat.view(-1, tiles, KEY_TILE, dim).transpose(-1, -2).contiguous()


def native_attention(
    query: Any, key: Any, value: Any, mask: Any, scaling: float | None = None, chunk: int = 64
) -> Any:
    """:func:`~pipeline.rerank.backends.hf.attention.grouped_attention` with each chunk's scores,
    mask and softmax in ``torch.ops.winnow.grouped_probs`` (q and k bf16, or all fp32); the
    probabilities × values GEMM stays torch's. Returns ``[rows, q, heads, dim]`` in the values' dtype."""
    import torch

    rows, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group, offset = heads // kv_heads, kv_len - q_len
    scale = scaling if scaling is not None else dim**-0.5
    if mask.dtype == torch.bool:
        bias = torch.zeros(rows, q_len, kv_len, dtype=torch.float32, device=query.device)
        bias.masked_fill_(~mask[:, 0], float("-inf"))
    else:
        bias = mask[:, 0].float().contiguous()
    keys = pack_keys(key)
    probs_op = torch.ops.winnow.grouped_probs
    out = value.new_empty(rows, q_len, heads, dim)
    for a in range(0, q_len, chunk):
        b = min(a + chunk, q_len)
        n, horizon = b - a, offset + b
        m = group * n
        q = query.new_empty(rows, kv_heads, -(-m // ROW_TILE) * ROW_TILE, dim)
        q[:, :, :m].view(rows, kv_heads, group, n, dim).copy_(
            query[:, :, a:b].view(rows, kv_heads, group, n, dim)
        )
        probs = probs_op(q.view(rows * kv_heads, -1, dim), keys, bias, m, n, a, horizon, scale)
        ctx = torch.matmul(probs.view(rows, kv_heads, m, horizon), value[:, :, :horizon])
        out[:, a:b] = ctx.view(rows, heads, n, dim).transpose(1, 2)
    return out
