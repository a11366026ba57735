"""The AdamW step of ``qft.optim``'s optimizers, on each backend: ``reference_step`` (torch, one tensor,
``torch.optim.AdamW``'s arithmetic), ``cpu_step`` (one tensor by ``qft._cpu``, the fused kernel's
arithmetic) and the fused multi-tensor Triton launch (``LaunchPlan``).

Not a ``qft::`` custom op: the fused launch reads every tensor through a table of addresses built
once and reused while none moves (the host cost of a step stays flat in the number of tensors), which
no op schema can describe; an optimizer step runs outside autograd and compiled graphs anyway. It
sits here so that kernels are launched from ``qft.ops`` only.
"""

from __future__ import annotations

import math

import torch

from qft.formats import moments8
from qft.kernels.adamw import LaunchPlan, host_scalars
from qft.ops import cpu_calls
from qft.ops.dispatch import FLOAT_DTYPES

__all__ = ["LaunchPlan", "cpu_step", "fusable", "host_scalars", "reference_step"]


def fusable(p: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether ``p`` and ``grad`` can take the fused step (off the reference backend): float and
    contiguous, both."""
    return p.dtype in FLOAT_DTYPES and grad.dtype in FLOAT_DTYPES and p.is_contiguous() and grad.is_contiguous()


def reference_step(p, grad, state, lr, beta1, beta2, eps, wd, maximize) -> None:
    """One ``torch.optim.AdamW`` step of ``p`` in place, its ``state`` (fp32 moments, or 8-bit
    ``moments8`` codes with their absmax) and step count updated."""
    grad = -grad if maximize else grad
    eight = "exp_avg_absmax" in state
    if eight:
        exp_avg = moments8.dequantize(state["exp_avg"], state["exp_avg_absmax"], True).view_as(p)
        exp_avg_sq = moments8.dequantize(state["exp_avg_sq"], state["exp_avg_sq_absmax"], False).view_as(p)
    else:
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    state["step"] += 1
    step = state["step"].item()
    # torch.optim.AdamW's single-tensor update, in the state's fp32; the parameter keeps its dtype.
    p32 = p.float() if p.dtype != torch.float32 else p
    p32.mul_(1 - lr * wd)
    exp_avg.lerp_(grad.float(), 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad.float(), grad.float(), value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    p32.addcdiv_(exp_avg, denom, value=-step_size)
    if p32 is not p:
        p.copy_(p32)
    if eight:  # written in place: managed state keeps its memory
        for name, value, signed in (("exp_avg", exp_avg, True), ("exp_avg_sq", exp_avg_sq, False)):
            codes, absmax = moments8.quantize(value, signed)
            state[name].copy_(codes)
            state[f"{name}_absmax"].copy_(absmax)


def cpu_step(p, grad, state, lr, beta1, beta2, eps, wd, maximize) -> None:
    """``reference_step`` by the CPU kernel (``fusable`` tensors on the CPU): the same state bit for bit
    (the moments' roundings are torch's: lerp and addcmul one fused multiply-add each), the parameter
    within an ulp of torch's where its vectorized sqrt rounds differently."""
    state["step"] += 1
    lr = lr.item() if isinstance(lr, torch.Tensor) else lr
    scalars = host_scalars(lr, beta1, beta2, eps, wd, maximize, state["step"].item())
    cpu_calls.adamw_step(p, grad, state, scalars)
