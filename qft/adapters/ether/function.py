"""ETHER's math: block-wise hyperplane reflections of a layer's input (and, optionally, output).

ETHER (Bini et al. 2024, "ETHER: Efficient Finetuning of Large-Scale Models with Hyperplane
Reflections") multiplies the weight by block-diagonal reflections ``H = I - 2 u u^T / ||u||^2`` per
block; ETHER+ relaxes each to ``H+ = I - u u^T / ||u||^2 + v v^T / ||v||^2`` (the identity when u = v).
Both are symmetric, so on the input side ``W' = W H`` is ``y = (x H) W^T``: each block of x loses (twice,
for ETHER) its component along u and, for ETHER+, gains its component along v. On the output side
``W' = H_out W`` is ``y = (x W^T) H_out`` (bias added after). Each reflection costs O(M d) per block
vector; nothing of W's size is formed.

``vectors`` holds one row per vector and block, ``[k, N, b]``: k = 1 (ETHER: u) or 2 (ETHER+: u, v).
The reflection is computed in fp32 and rounded to the input's dtype (as OFT's rotation); backward keeps
the input once in its own dtype.
"""

from __future__ import annotations

import torch

from qft.adapters import accumulation_dtype
from qft.functional import _without_autocast

# (vector index, coefficient): x' = x + sum_i coefficient * (x . v_i) v_i, v_i normalised
TERMS = {1: ((0, -2.0),), 2: ((0, -1.0), (1, 1.0))}


def _unit(vectors: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    norm = vectors.to(acc).norm(dim=-1, keepdim=True)
    return vectors.to(acc) / norm, norm


def reflect(x2d: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``x`` [M, N * b] with each block reflected by its vectors [k, N, b], in fp32 (fp64 for fp64 inputs)."""
    m = x2d.shape[0]
    k, n, b = vectors.shape
    acc = accumulation_dtype(x2d, vectors)
    units, _ = _unit(vectors, acc)
    x = x2d.to(acc).view(m, n, b)
    out = x.clone()
    for i, coefficient in TERMS[k]:
        out += coefficient * torch.einsum("mn,nb->mnb", torch.einsum("mnb,nb->mn", x, units[i]), units[i])
    return out.view(m, n * b)


class _Reflect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, vectors):
        ctx.save_for_backward(x2d if ctx.needs_input_grad[1] else None, vectors)
        return reflect(x2d, vectors).to(x2d.dtype)

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        x2d, vectors = ctx.saved_tensors
        grad_x = reflect(grad, vectors).to(grad.dtype) if ctx.needs_input_grad[0] else None  # H symmetric
        grad_vectors = None
        if ctx.needs_input_grad[1]:
            m = grad.shape[0]
            k, n, b = vectors.shape
            acc = accumulation_dtype(x2d, grad, vectors)
            units, norm = _unit(vectors, acc)
            x, g = x2d.to(acc).view(m, n, b), grad.to(acc).view(m, n, b)
            rows = []
            for i, coefficient in TERMS[k]:
                # d/du of c (x.u)(g.u) summed: c ((g.u) x + (x.u) g); then through u/||u||
                gu, xu = torch.einsum("mnb,nb->mn", g, units[i]), torch.einsum("mnb,nb->mn", x, units[i])
                d_unit = coefficient * (torch.einsum("mn,mnb->nb", gu, x) + torch.einsum("mn,mnb->nb", xu, g))
                along = (d_unit * units[i]).sum(-1, keepdim=True)
                rows.append((d_unit - along * units[i]) / norm[i])
            grad_vectors = torch.stack(rows).to(vectors.dtype)
        return grad_x, grad_vectors


def block_matrices(vectors: torch.Tensor) -> torch.Tensor:
    """Each block's reflection as a matrix, ``H_c = I + sum_i c_i u_i u_i^T`` [N, b, b] in fp32
    (differentiable; symmetric, so it is also OFT's ``x_c H_c`` rotation of the block)."""
    k, n, b = vectors.shape
    units, _ = _unit(vectors, accumulation_dtype(vectors))
    h = torch.eye(b, dtype=units.dtype, device=units.device).expand(n, b, b)
    for i, coefficient in TERMS[k]:
        h = h + coefficient * units[i].unsqueeze(2) * units[i].unsqueeze(1)
    return h


def reflect_blocks(x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``x`` [..., N * b] reflected block by block (differentiable in x and the vectors; keeps x once)."""
    lead = x.shape[:-1]
    with torch.autocast(x.device.type, enabled=False):  # the reflection runs in fp32 under autocast too
        return _Reflect.apply(x.reshape(-1, x.shape[-1]), vectors).view(*lead, x.shape[-1])
