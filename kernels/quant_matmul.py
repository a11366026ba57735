"""Triton fused quantized matmul for small M: ``y = x @ W^T (+ bias) (+ s * xa @ B^T)``.

The weight (any ``qft.formats`` format) is decoded tile by tile inside the K loop (never written
out), exactly as the dequantize kernels decode it, rounded to x's dtype and fed to ``tl.dot`` with fp32 accumulation.
The LoRA term is one more small dot in the epilogue, so y is written once. Decode indexes each
element by its flat position, so any K works (blocks may cross rows when K % block_size != 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qft import formats

from .decode import decode_tile, decode_values, weight_constants, weight_pointers


@triton.jit
def _quant_matmul_kernel(
    x_ptr,  # [M, K] row stride stride_xm
    W,  # the weight [N, K] (decode.weight_pointers)
    bias_ptr,  # [N] (HAS_BIAS)
    xa_ptr,  # [M, R] (HAS_LORA), row stride R
    lora_b_ptr,  # [N, R] (HAS_LORA), row stride R
    y_ptr,  # [M, N] row stride N
    M,
    N,
    K,
    R,
    scaling,
    stride_xm,
    FMT: tl.constexpr,  # decode.weight_constants
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), "tf32"/default otherwise
    ROW_BLOCKS: tl.constexpr,  # K % BLOCK_SIZE == 0 and BLOCK_K % 32 == 0: decode_tile, else decode_values
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        # masked x is 0, so the weight's masked (finite: zero codes and scales) values add nothing
        x_ok = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :], mask=x_ok, other=0.0)
        if ROW_BLOCKS:
            w = decode_tile(W, cols, k0, K, col_ok, FMT, BLOCK_N, BLOCK_K)
        else:  # blocks may cross rows: each value from its flat position
            flat = cols[:, None].to(tl.int64) * K + ks[None, :]  # [BLOCK_N, BLOCK_K] positions in W
            w = decode_values(W, flat, col_ok[:, None] & k_ok[None, :], FMT)
        w = w.to(x_ptr.dtype.element_ty)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        rs = tl.arange(0, BLOCK_R)
        r_ok = rs < R
        xa = tl.load(xa_ptr + rows[:, None] * R + rs[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        lb = tl.load(lora_b_ptr + cols[:, None] * R + rs[None, :], mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        acc += scaling * tl.dot(xa.to(tl.float32), tl.trans(lb.to(tl.float32)), input_precision="ieee")
    y_index = rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(y_ptr + y_index, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def quant_matmul(
    x: torch.Tensor,
    weight: formats.Weight,
    bias: torch.Tensor | None = None,
    lora_xa: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scaling: float = 0.0,
) -> torch.Tensor:
    """Fused decode + matmul (+ bias, + LoRA epilogue) with Triton; returns y [M, N] in x's dtype.

    ``x`` [M, K] fp32/fp16/bf16; ``weight`` holds W [N, K] (N = numel / K) in any ``qft.formats``
    format; ``lora_xa`` [M, r] and ``lora_B`` [N, r] may be fp32. Callers check shapes and devices
    (``qft.ops``); an OFT x arrives rotated.
    """
    m, k = x.shape
    n = weight.numel // k
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    has_lora = lora_xa is not None
    r = lora_xa.shape[1] if has_lora else 0
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    # A code book with zeros holds its gathered levels and the zero tile at once: a narrower K step keeps
    # it in registers (nf4_icq spills at 64 on sm_90, 255 registers)
    block_k = 32 if weight.zeros is not None and not formats.get_format(weight.fmt).affine else 64
    grid = (triton.cdiv(n, 64), triton.cdiv(m, block_m))
    _quant_matmul_kernel[grid](
        x,
        weight_pointers(weight),
        bias if bias is not None else x,
        lora_xa.contiguous() if has_lora else x,
        lora_B.contiguous() if has_lora else x,
        y,
        m,
        n,
        k,
        r,
        float(scaling),
        x.stride(0),
        FMT=weight_constants(weight),
        HAS_BIAS=bias is not None,
        HAS_LORA=has_lora,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        ROW_BLOCKS=k % weight.block_size == 0 and block_k % 32 == 0,
        BLOCK_M=block_m,
        BLOCK_N=64,
        BLOCK_K=block_k,
        BLOCK_R=max(16, triton.next_power_of_2(r)),
        enable_fp_fusion=False,
    )
    return y
