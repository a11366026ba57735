"""The CPU backend: the reference's paths and arithmetic (``qft.reference``), with the weight decoded by
``qft._cpu`` instead of torch's many small ops.

A linear op decodes W straight into fp32, each value rounded through x's dtype as the reference's
``formats.dequantize(w, x.dtype).float()`` rounds it, into this thread's scratch buffer (``scratch``:
no page faults from a fresh large allocation per call), then runs the reference's fp32 GEMMs on it:
the same operands and calls as the reference, so the same bits.

Three exceptions, where they pay. At M <= ``GEMV_MAX_M`` the forward is one decode GEMV
(``qft._cpu.quant_gemv``): code values times x summed in fp32 and scaled once per block, as the CUDA
GEMV does, so the decoded weights are not rounded to x's dtype (closer to the exact product than the
reference, not bit-equal to it). On a CPU that multiplies bf16 natively (AVX512-BF16; twice the fp32
GEMM's rate), bf16 layers from ``FUSED_MIN_M`` rows (grad input: from M = 1, without dropout) while
their activations fit ``FUSED_MAX_ACTIVATION_BYTES`` take ``qft._cpu``'s bf16 kernels: one call from
the packed weight to the finished output, on torch's threads, the reference's operands (W decoded into
bf16) multiplied exactly and summed in fp32 in another order, bias and LoRA added in fp32, one rounding.
And bf16 x with M >= ``HALF_GEMM_MIN_M`` rows past those: W is decoded into bf16 and torch's bf16 GEMM
(fp32 sums) gives the base term rounded once to bf16; the reference's epilogue adds bias and LoRA to it
in fp32 and rounds the sum again: within one bf16 rounding of the reference, where PEFT over bitsandbytes
rounds the LoRA term too. Quantizing stays the reference's.
"""

from __future__ import annotations

import torch

from qft import formats, reference
from qft.ops import backend_reference, cpu_calls, lora_terms, scratch

quantize = backend_reference.quantize

# M up to which the forward takes the decode GEMV (qft._cpu.quant_gemv: nothing decoded into memory, one
# fused multiply-add per weight and x row; measured against decode + GEMM in benchmarks/results).
GEMV_MAX_M = 8
# M from which bf16 layers take the bf16 GEMM on a CPU with native bf16 (below it the fp32 GEMM costs
# little and keeps the reference's bits).
HALF_GEMM_MIN_M = 16
# Where bf16 layers take qft._cpu's bf16 kernels on a CPU with AVX512-BF16: one call from the packed
# weight to the output, split over torch's OpenMP threads. Below FUSED_MIN_M rows the GEMV wins the
# forward. The kernels read all the activations once per 16 outputs, so once those outgrow the caches
# torch's blocked GEMM on the decoded weight wins. Measured on the 2-core EPYC with two threads, kernel
# against decode + GEMM + epilogue:
# - 512 x 512, M = 16: 90 / 67 us (forward / grad input) against 129 / 152 us;
# - M = 128: 226 / 233 us against 296 / 342 us;
# - 1024 x 4096, M = 512 (4 MiB of x): 10.7 / 12.7 ms against 11.0 / 13.3 ms;
# - M = 2048 (16 MiB of x): forward 58 ms against 44 ms.
# On one thread each (torch.set_num_threads(1)) the kernels still match or win at M = 128 and 512.
FUSED_MIN_M = 3
FUSED_MAX_ACTIVATION_BYTES = 4 << 20


def dequantize(weight: formats.Weight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Every value of ``weight`` in ``dtype`` (flat), into ``out`` or a new tensor."""
    if out is None:
        out = torch.empty(weight.numel, dtype=dtype)
    cpu_calls.dequantize(weight.map(torch.Tensor.contiguous), out, dtype)
    return out


def _decoded(weight: formats.Weight, rows: int, out_dtype: torch.dtype, round_dtype: torch.dtype) -> torch.Tensor:
    out = scratch.buffer(torch.device("cpu"), out_dtype, weight.numel)
    cpu_calls.dequantize(weight.map(torch.Tensor.contiguous), out, round_dtype)
    return out.view(rows, -1)


def decoded_matrix(weight: formats.Weight, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """The ``[rows, numel / rows]`` weight in fp32, each value rounded through ``dtype`` (float64: through
    fp32, as the reference decodes for gradcheck), in the scratch buffer: read it before the next decode."""
    if dtype == torch.float64:
        return backend_reference.decoded_matrix(weight, rows, dtype)
    return _decoded(weight, rows, torch.float32, dtype)


def half_gemm(t: torch.Tensor) -> bool:
    """Whether a layer over ``t`` [M, features] takes the bf16 GEMM (see the module's docstring)."""
    return t.dtype == torch.bfloat16 and t.shape[0] >= HALF_GEMM_MIN_M and cpu_calls.module().native_bf16()


def fused(t: torch.Tensor, weight: formats.Weight, backward: bool = False) -> bool:
    """Whether ``qft::quant_linear`` over x [M, K] (or its grad input over grad [M, N], ``backward``) takes
    the bf16 kernels (see the module's docstring, ``FUSED_MIN_M`` and ``FUSED_MAX_ACTIVATION_BYTES``)."""
    m, width = t.shape
    k = weight.numel // width if backward else width
    low = 1 if backward else FUSED_MIN_M
    return (
        t.dtype == torch.bfloat16
        and low <= m
        and m * width * t.element_size() <= FUSED_MAX_ACTIVATION_BYTES
        and k % 32 == 0
        and weight.block_size % 32 == 0
        and weight.numel % width == 0
        and cpu_calls.bf16_kernels()
    )


def gemv(x: torch.Tensor, weight: formats.Weight) -> bool:
    """Whether ``qft::quant_linear`` over x [M, K] takes the decode GEMV (see the module's docstring)."""
    k = x.shape[1]
    return 1 <= x.shape[0] <= GEMV_MAX_M and k % 32 == 0 and weight.block_size % 32 == 0 and weight.numel % k == 0


def _gemv_operands(x, n: int, bias, lora_xa, lora_B):
    """(bias, xa, B) as the GEMV reads them (fp32, contiguous), or None where a shape would not be read as
    the reference reads it (a broadcast bias, mismatched LoRA factors): those take the reference's path,
    which broadcasts or raises as torch does."""
    if bias is not None and tuple(bias.shape) != (n,):
        return None
    if lora_xa is not None:
        if not cpu_calls.lora_fits(x.shape[0], lora_xa, lora_B, lambda r: (n, r)):
            return None
        lora_xa, lora_B = lora_xa.float().contiguous(), lora_B.float().contiguous()
    return None if bias is None else bias.float().contiguous(), lora_xa, lora_B


def linear(x, weight, bias, lora_xa, lora_B, scaling: float) -> torch.Tensor:
    """``qft::quant_linear``: the decode GEMV at small M (``gemv``), else the reference's, or the bf16 GEMM
    plus fp32 bias and LoRA (``half_gemm``)."""
    n = weight.numel // x.shape[1]
    to_kernel = fused(x, weight)
    operands = _gemv_operands(x, n, bias, lora_xa, lora_B) if to_kernel or gemv(x, weight) else None
    if operands is not None and to_kernel:
        return cpu_calls.quant_linear_bf16(x.contiguous(), weight.map(torch.Tensor.contiguous), *operands, scaling)
    if operands is not None:
        y = x.new_empty((x.shape[0], n))
        cpu_calls.quant_gemv(x.contiguous(), weight.map(torch.Tensor.contiguous), *operands, scaling, y)
        return y
    if not half_gemm(x):
        return backend_reference.linear(x, weight, bias, lora_xa, lora_B, scaling, decoded_matrix)
    acc = torch.mm(x, _decoded(weight, n, x.dtype, x.dtype).t()).float()
    return reference.linear_epilogue(acc, bias, lora_xa, lora_B, scaling, x.dtype)


def linear_grad_input(grad, weight, lora_grad_xa, lora_A, dropout_mask, dropout_scale: float) -> torch.Tensor:
    """``qft::quant_linear_grad_input``: the bf16 kernel (``fused``, without dropout), the reference's, or
    ``grad @ W`` by the bf16 GEMM plus the fp32 LoRA term (``half_gemm``)."""
    k = weight.numel // grad.shape[1]
    fits = lora_grad_xa is None or cpu_calls.lora_fits(grad.shape[0], lora_grad_xa, lora_A, lambda r: (r, k))
    if dropout_mask is None and fused(grad, weight, backward=True) and fits:
        lora = () if lora_grad_xa is None else (lora_grad_xa.float().contiguous(), lora_A.float().contiguous())
        return cpu_calls.quant_linear_grad_input_bf16(grad.contiguous(), weight.map(torch.Tensor.contiguous), *lora)
    if not half_gemm(grad):
        return backend_reference.linear_grad_input(
            grad, weight, lora_grad_xa, lora_A, dropout_mask, dropout_scale, decoded_matrix
        )
    acc = torch.mm(grad, _decoded(weight, grad.shape[1], grad.dtype, grad.dtype)).float()
    return reference.grad_input_epilogue(acc, lora_grad_xa, lora_A, dropout_mask, dropout_scale, grad.dtype)


def lora_backward(grad, weight, x_lora, xa, lora_A, lora_B, scaling, mask, dropout_scale, need_x):
    """``qft::quant_lora_backward``: ``qft.reference.lora_backward``'s terms with this backend's grad input;
    for bf16 grad and fp32 adapters, grad_a and grad_b by ``lora_terms``' kernels (no fp32 copy of x or
    grad for them)."""
    if not (lora_A.dtype == lora_B.dtype == xa.dtype and lora_terms.kernels_take(grad, lora_A)):
        args = (grad, weight, x_lora, xa, lora_A, lora_B, scaling, mask, dropout_scale, need_x)
        return backend_reference.lora_backward(*args, grad_input=linear_grad_input)
    grad_xa = scaling * (grad.to(lora_B.dtype) @ lora_B)
    grad_x = linear_grad_input(grad, weight, grad_xa, lora_A, mask, dropout_scale) if need_x else grad.new_empty(0)
    grad_a = lora_terms.t_times(grad_xa, x_lora) if x_lora is not None else lora_A.new_empty(0)
    grad_b = (scaling * lora_terms.t_times(xa, grad)).t().contiguous()
    return grad_x, grad_a, grad_b
