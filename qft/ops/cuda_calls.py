"""The only place Python calls the kernels of ``qft._C``: one typed wrapper per entry point.

``qft._C`` takes raw addresses and integers (no torch headers), so pybind11 can only check the
number and kinds of arguments, and nothing checks their order. Each wrapper here takes tensors (or
``None`` for an optional part) by name, turns them into addresses in the order of
``csrc/bindings.cpp``, and raises the extension's own ``RuntimeError`` when a kernel refuses or
fails. ``tests/test_cuda_calls.py`` calls each wrapper the way the dispatcher does, on CPU tensors
of size zero (refused before any launch), so a signature drift fails on a machine without a GPU.

Callers prepare the tensors (contiguous, right dtypes, on one device) and keep them alive until
the launch is queued; ``stream`` is the raw handle from ``dispatch.cuda_stream``.
"""

from __future__ import annotations

import torch

from qft._extension import extension
from qft.ops.dispatch import DTYPE_CODES


def _module():
    ext = extension()
    if ext.module is None:
        raise RuntimeError(f"the qft CUDA extension is not available: {ext.error}")
    return ext.module


def _ptr(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def max_gemv_rows() -> int:
    """The largest M ``quant_gemv`` serves (``qft::kMaxGemvRows``)."""
    return _module().max_gemv_rows


def quantize_4bit(
    w: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    thresholds: torch.Tensor,
    encode_order: torch.Tensor,
    block_size: int,
    stream: int,
) -> None:
    """Blockwise 4-bit quantization of ``w`` into ``packed`` (uint8) and ``absmax`` (fp32)."""
    _module().quantize_4bit(
        _ptr(w), DTYPE_CODES[w.dtype], _ptr(packed), _ptr(absmax), _ptr(thresholds), _ptr(encode_order),
        w.numel(), block_size, stream,
    )  # fmt: skip


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    dynamic_map: torch.Tensor,
    code: torch.Tensor,
    out: torch.Tensor,
    numel: int,
    block_size: int,
    nested_block_size: int,
    stream: int,
) -> None:
    """Decode ``numel`` nf4/fp4 values into ``out`` (its dtype); ``nested_absmax`` None: fp32 absmax."""
    _module().dequantize_4bit(
        _ptr(packed), _ptr(absmax), _ptr(nested_absmax), _ptr(offset), _ptr(dynamic_map), _ptr(code), _ptr(out),
        DTYPE_CODES[out.dtype], numel, block_size, nested_block_size, stream,
    )  # fmt: skip


def dequantize_lowbit(
    packed: torch.Tensor,
    bits: int,
    scale: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    dynamic_map: torch.Tensor,
    code: torch.Tensor | None,
    zero: torch.Tensor | None,
    out: torch.Tensor,
    numel: int,
    block_size: int,
    nested_block_size: int,
    stream: int,
) -> None:
    """Decode ``numel`` values of a code-book (``code``) or affine (``zero``, fp16) format into ``out``."""
    _module().dequantize_lowbit(
        _ptr(packed), bits, zero is not None, _ptr(scale), _ptr(nested_absmax), _ptr(offset), _ptr(dynamic_map),
        _ptr(code), _ptr(zero), _ptr(out), DTYPE_CODES[out.dtype], numel, block_size, nested_block_size, stream,
    )  # fmt: skip


def quant_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    bits: int,
    zero: torch.Tensor | None,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    dynamic_map: torch.Tensor,
    code: torch.Tensor | None,
    block_size: int,
    nested_block_size: int,
    bias: torch.Tensor | None,
    lora_xa: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    y: torch.Tensor,
    stream: int,
) -> None:
    """``y [M, N] = x [M, K] @ W^T (+ bias) (+ scaling * lora_xa @ lora_b^T)`` for M <= ``max_gemv_rows``.

    ``zero`` (fp16 per block) for affine formats, else ``code`` (the fp32 code book).
    """
    rows, k = x.shape
    rank = 0 if lora_xa is None else lora_xa.shape[1]
    _module().quant_gemv(
        _ptr(x), DTYPE_CODES[x.dtype], _ptr(packed), bits, _ptr(zero), _ptr(absmax), _ptr(nested_absmax),
        _ptr(offset), _ptr(dynamic_map), _ptr(code), block_size, nested_block_size, _ptr(bias), _ptr(lora_xa),
        _ptr(lora_b), float(scaling), rank, _ptr(y), rows, y.shape[1], k, stream,
    )  # fmt: skip


def managed_alloc(nbytes: int) -> int:
    """cudaMallocManaged of ``nbytes``; returns the address."""
    return _module().managed_alloc(nbytes)


def managed_free(address: int) -> None:
    """cudaFree of an address from ``managed_alloc``."""
    _module().managed_free(address)


def managed_prefetch(address: int, nbytes: int, device: int, stream: int) -> bool:
    """Move a managed range to GPU ``device`` (the host if < 0); False where the GPU cannot prefetch."""
    return _module().managed_prefetch(address, nbytes, device, stream)
