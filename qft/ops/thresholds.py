"""Problem-size switch points between kernel paths, per GPU generation: the one table.

Not yet measured: no session so far had a GPU. The starting values follow bitsandbytes' own
switch on H100 (REFERENCE.md: its fused 4-bit kernel runs up to M ~16-64 for large weights, then
dequantize + cuBLAS). The linear benchmark (benchmarks/bench_linear.py) is where they get measured.
"""

from __future__ import annotations

import torch

# Largest M (rows of x) that runs the fused decode-in-matmul Triton kernel; above it the weight is
# dequantized into a scratch buffer and multiplied by cuBLAS. Keyed by compute capability.
FUSED_MAX_M: dict[str, int] = {"default": 16}
# Largest M that runs the CUDA decode GEMV (qft._C.quant_gemv, every format; at most qft._C.max_gemv_rows).
GEMV_MAX_M: dict[str, int] = {"default": 4}


def _lookup(table: dict[str, int], device: torch.device) -> int:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return table.get(f"sm{major}{minor}", table["default"])
    return table["default"]


def fused_max_m(device: torch.device) -> int:
    """The fused-kernel M limit for ``device`` (the default for CPU and unlisted GPUs)."""
    return _lookup(FUSED_MAX_M, device)


def gemv_max_m(device: torch.device) -> int:
    """The CUDA GEMV M limit for ``device``."""
    return _lookup(GEMV_MAX_M, device)
