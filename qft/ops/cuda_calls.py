"""The only place Python calls the kernels of ``qft._C``: one typed wrapper per entry point.

``qft._C`` takes raw addresses and integers (no torch headers), so pybind11 can only check the
kinds of arguments, not that an address is the right tensor's. Each wrapper here takes tensors (or
``None`` for an optional part) and a quantized weight as one ``qft.formats.Weight``, and passes
addresses by keyword, so pybind11 checks every name against ``csrc/bindings.cpp``; the weight
becomes one ``qft._C.QuantWeight`` (``_quant_weight``, which also looks up the format's tables).
A kernel that refuses or fails raises the extension's own ``RuntimeError``.
``tests/ops/test_cuda_calls.py`` calls each wrapper on CPU tensors of size zero (refused before any
launch), so a signature drift fails on a machine without a GPU.

Callers prepare the tensors and the weight's parts (contiguous, right dtypes, on one device) and keep
them alive until the launch is queued; ``stream`` is the raw handle from ``dispatch.cuda_stream``.
"""

from __future__ import annotations

import torch

from qft import formats
from qft._extension import extension
from qft.formats import Weight
from qft.ops.dispatch import DTYPE_CODES


def _module():
    ext = extension()
    if ext.module is None:
        raise RuntimeError(f"the qft CUDA extension is not available: {ext.error}")
    return ext.module


def _ptr(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _quant_weight(weight: Weight):
    """``weight`` as the extension's ``QuantWeight``: part addresses, its format's tables and numbers."""
    fmt = formats.get_format(weight.fmt)
    device = weight.device
    # The tables are cached per device (qft.formats.tables), so they outlive the launch.
    code = None if fmt.affine else formats.code(weight.fmt, device)
    dynamic_map = formats.dynamic_map(device) if weight.double_quant else None
    return _module().QuantWeight(
        codes=_ptr(weight.codes),
        scales=_ptr(weight.scales),
        zeros=_ptr(weight.zeros),
        nested_scales=_ptr(weight.nested_scales),
        offset=_ptr(weight.offset),
        code=_ptr(code),
        dynamic_map=_ptr(dynamic_map),
        bits=fmt.bits,
        affine=fmt.affine,
        numel=weight.numel,
        block_size=weight.block_size,
        nested_block_size=weight.nested_block_size,
    )


def max_gemv_rows() -> int:
    """The largest M ``quant_gemv`` serves (``qft::kMaxGemvRows``)."""
    return _module().max_gemv_rows


def quantize_codebook4(
    w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, fmt: str, block_size: int, stream: int
) -> None:
    """Blockwise nf4/fp4 quantization of ``w`` into ``codes`` (uint8, two per byte) and ``scales`` (fp32)."""
    formats.get_bnb_format(fmt)  # the kernel counts 15 thresholds: 4-bit code books only
    thresholds = formats.thresholds(fmt, w.device)
    order = formats.encode_order(fmt, w.device)
    _module().quantize_codebook4(
        w=_ptr(w),
        dtype=DTYPE_CODES[w.dtype],
        codes=_ptr(codes),
        scales=_ptr(scales),
        thresholds=_ptr(thresholds),
        encode_order=_ptr(order),
        numel=w.numel(),
        block_size=block_size,
        stream=stream,
    )


def dequantize(weight: Weight, out: torch.Tensor, stream: int) -> None:
    """Decode the ``weight.numel`` values of ``weight`` (any format) into ``out``, in its dtype: flat, or
    ``[rows, K]`` with unit column stride and any row stride >= K (other columns of a wider buffer)."""
    length, stride = (out.shape[1], out.stride(0)) if out.dim() == 2 else (out.numel(), out.numel())
    _module().dequantize(
        weight=_quant_weight(weight),
        out=_ptr(out),
        out_dtype=DTYPE_CODES[out.dtype],
        row_length=length,
        row_stride=stride,
        stream=stream,
    )


def quant_gemv(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    lora_xa: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    y: torch.Tensor,
    stream: int,
    workspace: torch.Tensor | None = None,
) -> None:
    """``y [M, N] = x [M, K] @ W^T (+ bias) (+ scaling * lora_xa @ lora_b^T)`` for M <= ``max_gemv_rows``.

    ``weight`` holds ``W`` row-major (``numel == N * K``); ``lora_xa`` and ``lora_b`` are fp32. With a
    ``workspace`` (fp32, ``splits x M x N`` values, splits >= 2) K is split that many ways.
    """
    _module().quant_gemv(**_gemv_arguments(x, weight, bias, lora_xa, lora_b, scaling, y, workspace), stream=stream)


def quant_gemv_emulate(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    lora_xa: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    y: torch.Tensor,
    workspace: torch.Tensor | None = None,
) -> None:
    """``quant_gemv``'s chunked kernel run on the CPU (every tensor a CPU one): the kernel's own arithmetic
    and summation order, for tests on machines without a GPU and bit-for-bit checks on one with it.
    Raises for shapes the kernel leaves to its per-value path."""
    _module().quant_gemv_emulate(**_gemv_arguments(x, weight, bias, lora_xa, lora_b, scaling, y, workspace))


def _gemv_arguments(x, weight, bias, lora_xa, lora_b, scaling, y, workspace) -> dict:
    rows, k = x.shape
    n = y.shape[1]
    splits = 1 if workspace is None else workspace.numel() // (rows * n)
    return {
        "x": _ptr(x),
        "dtype": DTYPE_CODES[x.dtype],
        "weight": _quant_weight(weight),
        "bias": _ptr(bias),
        "lora_xa": _ptr(lora_xa),
        "lora_b": _ptr(lora_b),
        "scaling": float(scaling),
        "rank": 0 if lora_xa is None else lora_xa.shape[1],
        "y": _ptr(y),
        "rows": rows,
        "n_out": n,
        "k_in": k,
        "splits": splits,
        "workspace": _ptr(workspace),
    }


def managed_alloc(nbytes: int) -> int:
    """cudaMallocManaged of ``nbytes``; returns the address."""
    return _module().managed_alloc(nbytes)


def managed_free(address: int) -> None:
    """cudaFree of an address from ``managed_alloc``."""
    _module().managed_free(address)


def managed_prefetch(address: int, nbytes: int, device: int, stream: int) -> bool:
    """Move a managed range to GPU ``device`` (the host if < 0); False where the GPU cannot prefetch."""
    return _module().managed_prefetch(address, nbytes, device, stream)
