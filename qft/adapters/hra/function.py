"""HRA's math (Yuan et al. 2024, Householder reflection adaptation; PEFT's ``HRAConfig``).

PEFT's HRA multiplies the weight by ``H = H_0 H_1 ... H_{r-1}``, ``H_i = I - 2 u_i u_i^T`` (u_i the
normalised columns of ``hra_u`` [in, r]), or with ``apply_GS`` by ``H = I - 2 U U^T`` (U the columns
orthonormalised by Gram-Schmidt): ``W' = W H``. So ``y = (x H^T) W^T + bias``: x is reflected by
``H_{r-1}`` first and ``H_0`` last, or loses twice its projection on U's span. Each reflection costs
O(M in); no in x in matrix is formed.

The reflection runs in fp32 (fp64 for fp64 inputs) and rounds to x's dtype; backward keeps x once in
its own dtype and recomputes the chain (each reflection is its own inverse).
"""

from __future__ import annotations

import torch

from qft.functional import _without_autocast


def units(hra_u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    """The unit vectors [in, r] H is made of, differentiable in ``hra_u`` (as PEFT's ``get_delta_weight``)."""
    if not apply_gs:
        return hra_u / hra_u.norm(dim=0)
    columns = [hra_u[:, 0] / hra_u[:, 0].norm()]
    for i in range(1, hra_u.shape[1]):
        u = hra_u[:, i]
        for previous in columns:
            u = u - (previous @ u) * previous
        columns.append(u / u.norm())
    return torch.stack(columns, dim=1)


def _acc(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def reflect(x: torch.Tensor, unit: torch.Tensor, chain: bool) -> torch.Tensor:
    """``x H^T`` for x [M, in]: the chain ``H_{r-1}`` first (``chain``), or ``x - 2 (x U) U^T``."""
    if not chain:
        return x - 2 * (x @ unit) @ unit.t()
    for i in reversed(range(unit.shape[1])):
        x = x - 2 * (x @ unit[:, i : i + 1]) @ unit[:, i : i + 1].t()
    return x


class _Householder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, unit, chain):
        ctx.save_for_backward(x2d if ctx.needs_input_grad[1] else None, unit)
        ctx.chain = chain
        acc = _acc(x2d, unit)
        return reflect(x2d.to(acc), unit.to(acc), chain).to(x2d.dtype)

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        x2d, unit = ctx.saved_tensors
        acc = _acc(grad, unit)
        u, g = unit.to(acc), grad.to(acc)
        grad_unit = None
        if not ctx.chain:  # z = x - 2 (x U) U^T
            if x2d is not None:
                x = x2d.to(acc)
                grad_unit = -2 * (x.t() @ (g @ u) + g.t() @ (x @ u))
            grad_x = g - 2 * (g @ u) @ u.t()
        else:  # walk the chain back: z_(i+1) = H_i z_i (an involution), g_(i+1) = H_i g_i
            z = None if x2d is None else reflect(x2d.to(acc), u, True)
            columns = []
            for i in range(u.shape[1]):
                ui = u[:, i : i + 1]
                if z is not None:
                    z = z - 2 * (z @ ui) @ ui.t()
                    columns.append(-2 * (z.t() @ (g @ ui) + g.t() @ (z @ ui)))
                g = g - 2 * (g @ ui) @ ui.t()
            grad_x = g
            if z is not None:
                grad_unit = torch.cat(columns, dim=1)
        grad_unit = None if grad_unit is None else grad_unit.to(unit.dtype)
        return grad_x.to(grad.dtype), grad_unit, None


def householder(x: torch.Tensor, hra_u: torch.Tensor, apply_gs: bool = False) -> torch.Tensor:
    """``x H^T`` for x [..., in] (HRA's input transform; differentiable in x and ``hra_u``)."""
    lead = x.shape[:-1]
    out = _Householder.apply(x.reshape(-1, x.shape[-1]), units(hra_u, apply_gs), not apply_gs)
    return out.view(*lead, x.shape[-1])


def delta_matrix(hra_u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    """H [in, in] itself (for merging): ``W' = W H``."""
    eye = torch.eye(hra_u.shape[0], dtype=torch.promote_types(hra_u.dtype, torch.float32), device=hra_u.device)
    return reflect(eye, units(hra_u, apply_gs).to(eye.dtype), not apply_gs).t()
