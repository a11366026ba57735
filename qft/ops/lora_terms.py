"""LoRA's thin products in the adapters' dtype: ``x A^T`` forward, ``g B``, ``grad_xa^T x`` and
``xa^T g`` backward (A [r, K], B [N, r], r small).

The reference widens bf16 activations into an fp32 copy for torch's fp32 GEMM (fp32 adapters over a
bf16 layer, as PEFT). On the CPU backend at the bf16 kernels' level (AVX512-BF16; the thin kernels need
only AVX-512F/BW, but share that one level), ``qft._cpu``'s kernels widen each bf16 value in a register
instead: the same fp32 products, summed in another order, and no fp32 tensor of x's size is
written. Measured on the 2-core EPYC at r = 16, kernel against the torch expression:

- ``x A^T``: 7.8 against 10.8 us at 16 x 512, 16.6 against 24.2 us at 128 x 512, 325 against 645 us at
  512 x 4096.
- ``grad_xa^T x``: 7.9 against 13.8 us at 16 x 512, 397 against 1200 us at 512 x 4096; ``xa^T g`` 118
  against 336 us at 512 x 1024.
- ``g B`` stays torch's: it would need B transposed (B is [N, r]), and that copy alone cost 9 us at
  N = 512, more than the kernel saves (160 against 122 us at 512 x 1024 before it).
"""

from __future__ import annotations

import torch

from qft.ops import cpu_calls, eager
from qft.ops.dispatch import on_gpu_backend


def kernels_take(a: torch.Tensor, f: torch.Tensor) -> bool:
    """Whether ``qft._cpu``'s thin-product kernels take bf16 activations ``a`` against fp32 adapter values
    ``f``: 2-D, non-empty, plain CPU tensors outside autograd, compile and transforms, on the CPU backend
    of a CPU at the bf16 kernels' level (``cpu_calls.bf16_kernels``)."""
    return (
        a.dtype == torch.bfloat16
        and f.dtype == torch.float32
        and a.dim() == 2
        and f.dim() == 2
        and a.numel() > 0
        and f.numel() > 0
        and not (torch.is_grad_enabled() and (a.requires_grad or f.requires_grad))
        and eager.untraced_cpu(a)
        and eager.untraced_cpu(f)
        and cpu_calls.avx512_kernels_for(a)
    )


def times_t(a: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``a @ f^T`` in f's dtype: a [M, width], f [outs, width]."""
    if kernels_take(a, f):
        return cpu_calls.bf16_times_fp32_nt(a.contiguous(), f.contiguous())
    return a.to(f.dtype) @ f.t()


def t_times(f: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``f^T @ a`` in f's dtype: f [M, outs], a [M, width]."""
    if kernels_take(a, f):
        return cpu_calls.fp32_tn_times_bf16(f.contiguous(), a.contiguous())
    return f.t() @ a.to(f.dtype)


def adapter_input(x_lora: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """``x_lora @ A^T`` (M x r) in the adapters' dtype. The reference multiplies in the adapters' dtype
    (fp32 adapters over a bf16 layer: fp32 products, as PEFT; ``times_t``); the GPU backends multiply in
    x's dtype (A rounded to it, fp32 sums), so no fp32 tensor of x's size is made."""
    if x_lora.dtype == lora_A.dtype or not on_gpu_backend(x_lora.device):
        return times_t(x_lora, lora_A)
    return (x_lora @ lora_A.t().to(x_lora.dtype)).to(lora_A.dtype)
