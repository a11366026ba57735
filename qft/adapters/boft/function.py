"""BOFT's math (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
Factorization"; PEFT's ``BOFTConfig``).

PEFT's BOFT multiplies the layer's input by ``M = B_{m-1} ... B_1 B_0`` and scales its output rows by
``boft_s``: ``y = s * ((x M) W^T) + bias``, i.e. ``W' = diag(s) W M^T``. Each butterfly factor is
``B_i = P_i blockdiag(Q_i1, ..., Q_iD) P_i^T``: D orthogonal b x b blocks (the Cayley transform of the
skew part of ``boft_R[i]``) between a fixed permutation P_i and its inverse, which pairs blocks
``2^i`` chunks apart so that m factors mix ``b 2^(m-1)`` features.

qft never forms M or P (PEFT keeps P as m dense [in, in] matrices per layer): ``x M`` is m rounds of a
gather and a batched b x b product, O(M in b m), run in fp32 (fp64 for fp64 inputs) and rounded to x's
dtype. Backward keeps x once in its own dtype and Q, recomputes the m intermediate inputs, and walks
back with Q^T.
"""

from __future__ import annotations

import torch

from qft.adapters import accumulation_dtype
from qft.functional import _without_autocast


def butterfly_perms(in_features: int, block_num: int, block_size: int, factors: int) -> torch.Tensor:
    """P_i as index vectors [m, in] (PEFT's ``block_butterfly_perm``): ``x P_i^T = x[:, perms[i]]``.

    Factor i cuts the features into groups of ``b 2^i`` and reorders each group's half-block chunks
    (b / 2 features) even ones first; factor 0, and every factor of a one-factor BOFT, is the identity."""
    perms = torch.arange(in_features).repeat(factors, 1)
    if factors == 1:
        return perms
    half = block_size // 2
    for i in range(factors):
        chunks = 2 ** (i + 1)  # half-blocks per group of b 2^i features
        order = torch.cat([torch.arange(0, chunks, 2), torch.arange(1, chunks, 2)])
        grouped = perms[i].view(in_features // (half * chunks), chunks, half)
        perms[i] = grouped[:, order].reshape(-1)
    assert block_num * block_size == in_features
    return perms


def cayley(boft_r: torch.Tensor) -> torch.Tensor:
    """Q = (I - S)(I + S)^-1 with S = (R - R^T) / 2 for R [..., b, b] (PEFT's ``cayley_batch``;
    differentiable, computed in R's dtype)."""
    skew = 0.5 * (boft_r - boft_r.transpose(-1, -2))
    eye = torch.eye(boft_r.shape[-1], dtype=boft_r.dtype, device=boft_r.device).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def _rounds(x: torch.Tensor, q: torch.Tensor, perms: torch.Tensor, inverse: torch.Tensor, keep: list | None):
    """``x M``: for factor i = m-1 .. 0, gather by P_i, multiply each block by Q_i, gather back.
    ``keep`` collects each factor's block input (for backward)."""
    m, blocks, b, _ = q.shape
    for i in reversed(range(m)):
        w = x[:, inverse[i]]  # x P_i
        if keep is not None:
            keep.append(w)
        x = torch.bmm(w.view(-1, blocks, b).transpose(0, 1), q[i]).transpose(0, 1).reshape(x.shape)
        x = x[:, perms[i]]  # (x P_i Q_i) P_i^T
    return x


class _Butterfly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, q, perms, inverse):
        ctx.save_for_backward(x2d if ctx.needs_input_grad[1] else None, q, perms, inverse)
        acc = accumulation_dtype(x2d, q)
        return _rounds(x2d.to(acc), q.to(acc), perms, inverse, None).to(x2d.dtype)

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        x2d, q, perms, inverse = ctx.saved_tensors
        acc = accumulation_dtype(grad, q)
        qa = q.to(acc)
        m, blocks, b, _ = q.shape
        inputs: list = []
        if x2d is not None:
            _rounds(x2d.to(acc), qa, perms, inverse, inputs)  # inputs[j] is factor m-1-j's
        g = grad.to(acc)
        grad_q = torch.empty_like(qa) if x2d is not None else None
        for i in range(m):  # the last round applied (factor 0) first
            gw = g[:, inverse[i]].view(-1, blocks, b).transpose(0, 1)  # grad of the block product's output
            if grad_q is not None:
                w = inputs[m - 1 - i].view(-1, blocks, b).transpose(0, 1)
                grad_q[i] = torch.bmm(w.transpose(1, 2), gw)
            g = torch.bmm(gw, qa[i].transpose(1, 2)).transpose(0, 1).reshape(g.shape)[:, perms[i]]
        grad_q = None if grad_q is None else grad_q.to(q.dtype)
        return g.to(grad.dtype), grad_q, None, None


def butterfly(x: torch.Tensor, q: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """``x M`` for x [..., in], Q [m, D, b, b] and the factors' permutations [m, in] (differentiable in x
    and Q), in x's dtype."""
    inverse = torch.argsort(perms, dim=1)
    lead = x.shape[:-1]
    return _Butterfly.apply(x.reshape(-1, x.shape[-1]), q, perms, inverse).view(*lead, x.shape[-1])


def butterfly_matrix(q: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """M [in, in] itself (for merging), in Q's dtype (at least fp32)."""
    eye = torch.eye(perms.shape[1], dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    return butterfly(eye, q.to(eye.dtype), perms)


def block_dropout(q: torch.Tensor, p: float) -> torch.Tensor:
    """PEFT's BOFT dropout: in one factor drawn at random, ``int(p * D)`` blocks drawn at random become
    the identity. Draws with the same generator calls as PEFT, so a seed gives PEFT's mask."""
    m, blocks, b, _ = q.shape
    factor = torch.randint(0, m, (1,)).item()
    dropped = int(p * blocks)
    mask = torch.cat([torch.ones(dropped, device=q.device), torch.zeros(blocks - dropped, device=q.device)])
    mask = mask[torch.randperm(blocks)].view(1, blocks, 1, 1)
    full = torch.zeros(m, blocks, 1, 1, device=q.device)
    full[factor] = mask
    eye = torch.eye(b, device=q.device, dtype=q.dtype)
    return (1 - full) * q + full * eye
