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


def fused_max_m(device: torch.device) -> int:
    """The fused-kernel M limit for ``device`` (the default for CPU and unlisted GPUs)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return FUSED_MAX_M.get(f"sm{major}{minor}", FUSED_MAX_M["default"])
    return FUSED_MAX_M["default"]
