"""Custom ops of blockwise 4-bit quantization: ``qft::quantize_4bit``, ``qft::dequantize_4bit`` and
the double-quantization pair ``qft::quantize_nested`` / ``qft::dequantize_nested``."""

from __future__ import annotations

import torch

from qft import formats, reference
from qft.ops import cuda_calls
from qft.ops.dispatch import FLOAT_DTYPES, backend_for, cuda_stream, device_guard


def _check_common(block_size: int, fmt: str) -> None:
    formats.get_4bit_format(fmt)
    formats.check_block_size(block_size)


def _expect(tensor, name: str, dtype: torch.dtype, numel: int, device: torch.device, dims: int = 1) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dim() != dims:  # the right count in another shape ([n, 1] scales) would broadcast in a decode
        raise ValueError(
            f"{name} must be {'a 0-dim scalar' if dims == 0 else f'{dims}-D'}, got shape {tuple(tensor.shape)}"
        )
    if tensor.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {tensor.dtype}")
    if tensor.numel() != numel:
        raise ValueError(f"{name} must hold {numel} values for this shape and block size, got {tensor.numel()}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but packed is on {device}")


def check_quantized_parts(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    numel: int,
    block_size: int,
    nested_block_size: int = formats.NESTED_BLOCK_SIZE,
    fmt: str = "nf4",
    zero: torch.Tensor | None = None,
) -> None:
    """Check that packed codes and scales fit ``numel`` values; ``ValueError`` naming the part if not.

    Kernels index by ``numel`` and ``block_size`` alone, so a part of the wrong size, dtype or device
    would be read out of bounds: every decode checks first.
    """
    if (nested_absmax is None) != (offset is None):
        raise ValueError("nested_absmax and offset must be given together")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a tensor, got {type(packed).__name__}")
    device = packed.device
    spec = formats.get_format(fmt)
    blocks = formats.num_blocks(numel, block_size)
    _expect(packed, "packed", formats.packed_dtype(spec.bits), formats.packed_numel(numel, spec.bits), device)
    if spec.affine:
        _expect(zero, "zero", torch.float16, blocks, device)
    elif zero is not None:
        raise ValueError(f"zero is only for affine formats, not {fmt}")
    if nested_absmax is None:
        _expect(absmax, "absmax", torch.float32, blocks, device)
        return
    if isinstance(nested_block_size, bool) or not isinstance(nested_block_size, int) or nested_block_size <= 0:
        raise ValueError(f"nested_block_size must be a positive int, got {nested_block_size!r}")
    _expect(absmax, "absmax", torch.uint8, blocks, device)
    _expect(nested_absmax, "nested_absmax", torch.float32, formats.num_blocks(blocks, nested_block_size), device)
    _expect(offset, "offset", torch.float32, 1, device, dims=0)


def _quantize_4bit_cuda(w: torch.Tensor, block_size: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.contiguous()
    numel = w.numel()
    packed = torch.empty(formats.packed_numel(numel), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(formats.num_blocks(numel, block_size), dtype=torch.float32, device=w.device)
    thresholds = formats.thresholds(fmt, w.device)
    order = formats.encode_order(fmt, w.device)
    with device_guard(w.device):
        cuda_calls.quantize_4bit(w, packed, absmax, thresholds, order, block_size, cuda_stream(w.device))
    return packed, absmax


def _dequantize_4bit_cuda(
    packed, absmax, nested_absmax, offset, block_size, fmt, numel, dtype, nested_block_size, out=None
):
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=packed.device)
    # Hold the contiguous copies in locals: a temporary freed before the launch could be reused.
    packed, absmax, nested_absmax, offset, _, code = cuda_weight_parts(packed, absmax, nested_absmax, offset, None,
                                                                       fmt)  # fmt: skip
    dmap = formats.dynamic_map(packed.device)
    with device_guard(packed.device):
        cuda_calls.dequantize_4bit(
            packed, absmax, nested_absmax, offset, dmap, code, out, numel, block_size, nested_block_size,
            cuda_stream(packed.device),
        )  # fmt: skip
    return out


@torch.library.custom_op("qft::quantize_4bit", mutates_args=())
def quantize_4bit(w: torch.Tensor, block_size: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization of ``w`` (fp32/fp16/bf16, any shape, finite).

    Returns ``(packed uint8 [(n + 1) // 2], absmax fp32 [ceil(n / block_size)])``; see
    ``qft.formats`` for the exact rule.
    """
    _check_common(block_size, fmt)
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"w must be float32/float16/bfloat16, got {w.dtype}")
    backend = backend_for(w.device)
    if w.numel() == 0:
        return w.new_empty((0,), dtype=torch.uint8), w.new_empty((0,), dtype=torch.float32)
    if backend == "cuda":
        return _quantize_4bit_cuda(w, block_size, fmt)
    if backend == "triton":
        from qft.kernels.quantize_4bit import quantize_4bit as triton_quantize

        return triton_quantize(w, block_size, fmt)
    return reference.quantize_4bit(w, block_size, fmt)


@quantize_4bit.register_fake
def _(w, block_size, fmt):
    n = w.numel()
    return (
        w.new_empty(((n + 1) // 2,), dtype=torch.uint8),
        w.new_empty((-(-n // block_size),), dtype=torch.float32),
    )


@torch.library.custom_op("qft::dequantize_4bit", mutates_args=())
def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    block_size: int,
    fmt: str,
    numel: int,
    dtype: torch.dtype,
    nested_block_size: int = formats.NESTED_BLOCK_SIZE,
) -> torch.Tensor:
    """Decode ``numel`` 4-bit values to a flat ``dtype`` tensor.

    ``absmax`` is fp32 per block, or uint8 dynamic-map codes when ``nested_absmax`` (fp32 per
    ``nested_block_size`` blocks) and ``offset`` (fp32 scalar) hold the double-quant state.
    """
    _check_common(block_size, fmt)
    check_quantized_parts(packed, absmax, nested_absmax, offset, numel, block_size, nested_block_size)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32/float16/bfloat16, got {dtype}")
    backend = backend_for(packed.device)
    if numel == 0:
        return packed.new_empty((0,), dtype=dtype)
    return dequantize_4bit_into(
        None, backend, packed, absmax, nested_absmax, offset, block_size, fmt, numel, dtype, nested_block_size
    )


def dequantize_4bit_into(
    out, backend, packed, absmax, nested_absmax, offset, block_size, fmt, numel, dtype, nested_block_size
) -> torch.Tensor:
    """Decode with ``backend`` into ``out`` (a contiguous ``[numel]`` buffer, or None to allocate).

    For ops that decode into a reused scratch buffer; callers have checked the parts.
    """
    args = (packed, absmax, nested_absmax, offset, block_size, fmt, numel, dtype, nested_block_size)
    if backend == "cuda":
        return _dequantize_4bit_cuda(*args, out=out)
    if backend == "triton":
        from qft.kernels.dequantize_4bit import dequantize_4bit as triton_dequantize

        return triton_dequantize(
            packed, absmax, block_size, fmt, numel, dtype, nested_absmax, offset, nested_block_size, out=out
        )
    if nested_absmax is not None:
        absmax = reference.dequantize_nested(absmax, nested_absmax, offset, nested_block_size)
    decoded = reference.dequantize_4bit(packed, absmax, block_size, fmt, numel, dtype)
    return decoded if out is None else out.copy_(decoded)


@dequantize_4bit.register_fake
def _(packed, absmax, nested_absmax, offset, block_size, fmt, numel, dtype, nested_block_size=256):
    return packed.new_empty((numel,), dtype=dtype)


@torch.library.custom_op("qft::dequantize_lowbit", mutates_args=())
def dequantize_lowbit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    zero: torch.Tensor | None,
    block_size: int,
    fmt: str,
    numel: int,
    dtype: torch.dtype,
    nested_block_size: int = formats.NESTED_BLOCK_SIZE,
) -> torch.Tensor:
    """Decode ``numel`` values of a 3-/2-bit code-book or affine int4/3/2 format (flat ``dtype``).

    ``absmax`` holds the per-block scale (fp32, or double-quantized codes with ``nested_absmax`` and
    ``offset``); ``zero`` (fp16 per group) is given for affine formats only.
    """
    formats.check_block_size(block_size, fmt)
    if formats.is_4bit_codebook(fmt):
        raise ValueError(f"{fmt} is a 4-bit code-book format: use qft::dequantize_4bit")
    check_quantized_parts(packed, absmax, nested_absmax, offset, numel, block_size, nested_block_size, fmt, zero)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32/float16/bfloat16, got {dtype}")
    return dequantize_lowbit_into(
        None, backend_for(packed.device), packed, absmax, nested_absmax, offset, zero, block_size, fmt, numel,
        dtype, nested_block_size,
    )  # fmt: skip


def dequantize_lowbit_into(
    out, backend, packed, absmax, nested_absmax, offset, zero, block_size, fmt, numel, dtype, nested_block_size
) -> torch.Tensor:
    """Decode with ``backend`` into ``out`` (or a new tensor); callers have checked the parts."""
    from qft import reference_lowbit

    if numel == 0:
        return packed.new_empty((0,), dtype=dtype) if out is None else out
    if backend == "cuda":
        return _dequantize_lowbit_cuda(
            packed, absmax, nested_absmax, offset, zero, block_size, fmt, numel, dtype, nested_block_size, out
        )
    if backend == "triton":
        from qft.kernels.dequantize_lowbit import dequantize_lowbit as triton_dequantize

        return triton_dequantize(
            packed, absmax, nested_absmax, offset, zero, block_size, fmt, numel, dtype, nested_block_size, out
        )
    scale = absmax
    if nested_absmax is not None:
        scale = reference.dequantize_nested(absmax, nested_absmax, offset, nested_block_size)
    spec = formats.get_format(fmt)
    codes = reference_lowbit.unpack(packed, spec.bits, numel) if spec.bits != 4 else _unpack_nibbles(packed, numel)
    if spec.affine:
        decoded = reference_lowbit.dequantize_affine(codes, scale, zero, block_size, dtype)
    else:
        decoded = reference_lowbit.dequantize_codebook(codes, scale, fmt, block_size, dtype)
    return decoded if out is None else out.copy_(decoded)


def cuda_weight_parts(packed, absmax, nested_absmax, offset, zero, fmt: str) -> tuple:
    """A quantized weight's parts as the CUDA kernels read them: contiguous, ``offset`` only with
    nested scales, ``zero`` for affine formats and else the format's code book on the weight's device.
    Returns ``(packed, absmax, nested_absmax, offset, zero, code)``; callers hold them until launch."""
    affine = formats.get_format(fmt).affine
    packed, absmax = packed.contiguous(), absmax.contiguous()
    if nested_absmax is not None:
        nested_absmax, offset = nested_absmax.contiguous(), offset.contiguous()
    else:
        offset = None
    zero = zero.contiguous() if affine else None
    code = None if affine else formats.code(fmt, packed.device)
    return packed, absmax, nested_absmax, offset, zero, code


def _dequantize_lowbit_cuda(packed, absmax, nested_absmax, offset, zero, block_size, fmt, numel, dtype, nbs, out):
    spec = formats.get_format(fmt)
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=packed.device)
    # Locals keep every contiguous copy alive until the launch has been queued.
    packed, absmax, nested_absmax, offset, zero, code = cuda_weight_parts(packed, absmax, nested_absmax, offset,
                                                                          zero, fmt)  # fmt: skip
    dmap = formats.dynamic_map(packed.device)
    with device_guard(packed.device):
        cuda_calls.dequantize_lowbit(
            packed, spec.bits, absmax, nested_absmax, offset, dmap, code, zero, out, numel, block_size, nbs,
            cuda_stream(packed.device),
        )  # fmt: skip
    return out


def _unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:numel].long()


@dequantize_lowbit.register_fake
def _(packed, absmax, nested_absmax, offset, zero, block_size, fmt, numel, dtype, nested_block_size=256):
    return packed.new_empty((numel,), dtype=dtype)


@torch.library.custom_op("qft::quantize_nested", mutates_args=())
def quantize_nested(absmax: torch.Tensor, nested_block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double-quantize fp32 absmax: ``(codes uint8 [n], absmax2 fp32 [blocks], offset fp32 [])``.

    Torch ops on every device: the tensor is 1/64 of the weight or less.
    """
    return reference.quantize_nested(absmax, nested_block_size)


@quantize_nested.register_fake
def _(absmax, nested_block_size):
    n = absmax.numel()
    return (
        absmax.new_empty((n,), dtype=torch.uint8),
        absmax.new_empty((-(-n // nested_block_size),), dtype=torch.float32),
        absmax.new_empty((), dtype=torch.float32),
    )


@torch.library.custom_op("qft::dequantize_nested", mutates_args=())
def dequantize_nested(
    codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor, nested_block_size: int
) -> torch.Tensor:
    """Recover fp32 absmax from double-quant state (``qft.reference.dequantize_nested``)."""
    return reference.dequantize_nested(codes, nested_absmax, offset, nested_block_size)


@dequantize_nested.register_fake
def _(codes, nested_absmax, offset, nested_block_size):
    return codes.new_empty((codes.numel(),), dtype=torch.float32)
