"""ApiQ's layer-wise initialization (Liao & Monz 2024, "ApiQ: Finetuning of 2-Bit Quantized Large
Language Model"): choose the quantized weight Q and the LoRA factors together so that the layer's
output on calibration inputs X is kept, ``min ||X W^T - X (Q + s B A)^T||``, where LoftQ keeps the
weight itself, ``min ||W - Q - s B A||``.

With ``H = X^T X / n`` the objective is ``tr(E H E^T)`` for ``E = W - Q - s B A``. ApiQ descends it with
gradients through learnable clipping; qft solves the same objective by alternating two exact or greedy
minimisations, which needs no learning rate and no pass over the activations:

* Q given B, A: GPTQ's error feedback on ``W - s B A`` under H when the QuantConfig's method is
  ``"gptq"`` (the greedy minimiser of this objective), else the config's own rounding;
* B, A given Q: with ``H + damp = L L^T``, ``tr(E (H + damp) E^T) = ||E L||^2``, so the best rank-r
  ``s B A`` under the damped H is ``U_r S_r V_r^T L^-1`` from the SVD of ``(W - Q) L`` (Eckart-Young in
  the whitened space); the damping (GPTQ's 1% of the mean diagonal) keeps inputs never seen in
  calibration from being fitted freely.

The round with the least calibration error is kept (GPTQ is greedy, so a later round is not always
better).
"""

from __future__ import annotations

import math

import torch

from qft.formats.gptq import DAMP, damped
from qft.tensor import QuantizedTensor, quantize


def output_error(residual: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(E H E^T)``: the mean squared output error ``||X E^T||^2 / n`` of a weight error E [N, K]."""
    e = residual.double()
    return float(((e @ hessian.to(e.device, torch.float64)) * e).sum())


def _whitening(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower Cholesky factor L of ``H + damp * mean(diag H) * I`` (fp64); dead inputs get the damping alone."""
    return torch.linalg.cholesky(damped(hessian.double(), damp))


@torch.no_grad()
def apiq(
    weight: torch.Tensor, hessian: torch.Tensor, quant_config, lora_config, damp: float = DAMP
) -> tuple[QuantizedTensor, torch.Tensor, torch.Tensor]:
    """``(qt, A [r, in], B [out, r])`` minimising the calibration output error ``tr(E H E^T)`` of
    ``E = W - dequantize(qt) - scaling * B @ A`` over ``lora_config.loftq_iters`` alternating rounds (see
    the module text). ``hessian``: the layer's ``X^T X / n`` [in, in] (``qft.nn.calibrate``). A and B come
    back in ``lora_config.adapter_dtype``."""
    w = weight.detach().float()
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"hessian must be [{w.shape[1]}, {w.shape[1]}] for this layer, got {tuple(hessian.shape)}")
    r, scaling = lora_config.r, lora_config.scaling
    c = quant_config
    gptq = c.method == "gptq"
    h = hessian.to(w.device, torch.float32)
    lower = _whitening(h.to(torch.float64), damp)
    correction = torch.zeros_like(w)
    best = None
    for _ in range(lora_config.loftq_iters):
        target = (w - correction).to(weight.dtype)
        qt = quantize(target, c.format, c.block_size, c.double_quant, c.method, h if gptq else None, c.act_order)
        residual = (w - qt.dequantize(torch.float32)).double()
        u, s, vh = torch.linalg.svd(residual @ lower, full_matrices=False)
        # s B A = U_r S_r (L^-T V_r)^T, split as LoftQ splits it: sqrt(S_r) to each side
        directions = torch.linalg.solve_triangular(lower.t(), vh[:r].t(), upper=True).t()
        root = s[:r].sqrt() / math.sqrt(scaling)
        b = (u[:, :r] * root).float()
        a = (root.unsqueeze(1) * directions).float()
        correction = scaling * (b @ a)
        error = output_error(residual - correction.double(), h)
        if best is None or error < best[0]:
            best = (error, qt, a, b)
    _, qt, a, b = best
    return qt, a.to(lora_config.adapter_dtype), b.to(lora_config.adapter_dtype)
