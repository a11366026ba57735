"""How a qft op picks its implementation.

* CPU -> the CPU extension ``qft._cpu`` when it is built (``backend_cpu``: the reference's paths with
  compiled decode, small-M GEMV and optimizer kernels; the reference's bits except where its docstring
  says), else ``qft.reference`` (pure torch, also the oracle);
* CUDA -> the CUDA extension ``qft._C`` when it is built and sees a GPU, else the Triton kernels
  (ops with size-dependent paths consult ``qft.ops.thresholds`` too).

``use_backend("triton")`` (or the environment variable ``QFT_BACKEND``) forces one implementation,
for tests and benchmarks; Triton also runs on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from qft import formats
from qft._extension import cpu_extension, extension

BACKENDS = ("reference", "cpu", "triton", "cuda")
# The backends that take the GPU paths (fused kernels, weight-side rotations, the K + r GEMM); the CPU
# backend takes the reference's.
GPU_BACKENDS = ("triton", "cuda")
# Element-type codes shared with csrc/qft_kernels.h (qft::DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
FLOAT_DTYPES = formats.FLOAT_DTYPES
assert tuple(DTYPE_CODES) == FLOAT_DTYPES

_forced: list[str] = []


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every qft op inside the ``with`` block onto one implementation."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "cpu" and not cpu_extension().usable:
        raise RuntimeError(f"the qft CPU extension is not available: {cpu_extension().error}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def backend_for(device: torch.device | str) -> str:
    """The implementation a qft op runs with for tensors on ``device``."""
    if _forced:
        return _forced[-1]
    env = os.environ.get("QFT_BACKEND", "")
    if env:
        if env not in BACKENDS:
            raise ValueError(f"QFT_BACKEND must be one of {BACKENDS}, got {env!r}")
        if env == "cpu" and not cpu_extension().usable:
            raise RuntimeError(f"QFT_BACKEND=cpu: the qft CPU extension is not available: {cpu_extension().error}")
        return env
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu" if device.type == "cpu" and cpu_extension().usable else "reference"
    return "cuda" if extension().usable else "triton"


def on_gpu_backend(device: torch.device | str) -> bool:
    """Whether ops on ``device`` take the GPU backends' paths (else the reference's, on any backend)."""
    return backend_for(device) in GPU_BACKENDS


def cuda_stream(device: torch.device) -> int:
    """The raw handle of the current CUDA stream on ``device`` (for ``qft._C``); 0 off a GPU, where
    the call contract tests reach the extension with CPU tensors."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for a GPU (kernels launch on the tensors' device), else a no-op."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
