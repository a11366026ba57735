"""Problem-size switch points between kernel paths, per GPU generation: the one table.

Measured on an H200 (sm90), 2026-11-29, `benchmarks/results/lowbit-nvidia-h200-2026-11-29.md`: at
8192x28672 the CUDA decode GEMV took 0.49-0.70 ms at M = 1 and 1.2-2.4 ms at M = 4, and the fused
Triton kernel 7.8-12.2 ms at M = 16, for every format, where dequantize (0.19-0.31 ms) plus the bf16
cuBLAS product (0.12 ms) takes 0.31-0.43 ms. So on sm90 every M takes decode + cuBLAS. The GEMV has
since been rebuilt (chunked, csrc/gemv_core.cuh; a static model puts it near 3.9x bf16 at M = 1 for
4-bit) but has not run on a GPU: sm90 keeps the measured route until `benchmarks/gpu_check.sh`
(stage smallm times every path pinned) measures it. Other GPUs keep the starting values
(bitsandbytes' own switch on H100, REFERENCE.md), unmeasured.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

# Largest M (rows of x) that runs the fused decode-in-matmul Triton kernel; above it the weight is
# dequantized into a scratch buffer and multiplied by cuBLAS. Keyed by compute capability.
FUSED_MAX_M: dict[str, int] = {"default": 16, "sm90": 0}
# Largest M that runs the CUDA decode GEMV (qft._C.quant_gemv, every format; at most qft._C.max_gemv_rows).
GEMV_MAX_M: dict[str, int] = {"default": 4, "sm90": 0}

# The chunked GEMV (csrc/gemv_core.cuh) gives each lane whole 64-value chunks, a warp about four weight
# rows, 8 warps a CTA, and is register-sized for two CTAs an SM.
GEMV_CHUNK, GEMV_ROWS_PER_WARP, GEMV_RESIDENT_WARPS_PER_SM = 64, 4, 16

_forced: list[dict[str, int]] = []


@contextlib.contextmanager
def forced(fused_max_m: int | None = None, gemv_max_m: int | None = None) -> Iterator[None]:
    """Use these limits on every device inside the ``with`` block (tests pin each kernel path)."""
    limits = {k: v for k, v in (("fused", fused_max_m), ("gemv", gemv_max_m)) if v is not None}
    _forced.append(limits)
    try:
        yield
    finally:
        _forced.pop()


@functools.cache
def device_facts(index: int) -> tuple[str, int]:
    """``("sm90", 132)``: GPU ``index``'s compute capability and SM count, read once (every small-M
    linear asks two or three times per call)."""
    props = torch.cuda.get_device_properties(index)
    return f"sm{props.major}{props.minor}", props.multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _lookup(name: str, table: dict[str, int], device: torch.device) -> int:
    if _forced and name in _forced[-1]:
        return _forced[-1][name]
    if device.type == "cuda":
        return table.get(device_facts(_index(device))[0], table["default"])
    return table["default"]


def fused_max_m(device: torch.device) -> int:
    """The fused-kernel M limit for ``device`` (the default for CPU and unlisted GPUs)."""
    return _lookup("fused", FUSED_MAX_M, device)


def gemv_max_m(device: torch.device) -> int:
    """The CUDA GEMV M limit for ``device``."""
    return _lookup("gemv", GEMV_MAX_M, device)


def gemv_splits(device: torch.device, n_out: int, k_in: int) -> int:
    """How many ways the chunked GEMV splits K: 1 while the rows alone fill the GPU's warp slots, else
    enough splits to fill them, keeping at least one chunk per lane per split. A starting rule, not
    yet measured: each split past one costs an fp32 partial per output and a second launch."""
    if device.type != "cuda":
        return 1
    slots = device_facts(_index(device))[1] * GEMV_RESIDENT_WARPS_PER_SM
    warps = -(-n_out // GEMV_ROWS_PER_WARP)
    most = max(1, k_in // (GEMV_CHUNK * 32))
    return 1 if warps >= slots else min(most, -(-slots // warps))
