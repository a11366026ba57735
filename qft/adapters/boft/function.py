"""BOFT's math (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
Factorization"; PEFT's ``BOFTConfig``).

PEFT's BOFT multiplies the layer's input by ``M = B_{m-1} ... B_1 B_0`` and scales its output rows by
``boft_s``: ``y = s * ((x M) W^T) + bias``, i.e. ``W' = diag(s) W M^T``. Each butterfly factor is
``B_i = P_i blockdiag(Q_i1, ..., Q_iD) P_i^T``: D orthogonal b x b blocks (the Cayley transform of the
skew part of ``boft_R[i]``) between a fixed permutation P_i and its inverse, which pairs blocks
``2^i`` chunks apart.

Factor i moves features only within groups of ``b 2^i``, so M is block diagonal with groups of
``g = b 2^(m-1)``: ``x M`` is OFT's block rotation with ``in / g`` blocks ``G_c`` [g, g]. qft builds the
G_c from Q (m rounds of a gather and a batched b x b product over g x in values, never PEFT's m dense
[in, in] permutation matrices or the [in, in] M) and runs OFT's path: x rotated once (one kernel on a
GPU), or at large M with M >= N the decoded weight; backward keeps x once in its own dtype and G.
"""

from __future__ import annotations

import torch


def butterfly_perms(in_features: int, block_num: int, block_size: int, factors: int) -> torch.Tensor:
    """P_i as index vectors [m, in] (PEFT's ``block_butterfly_perm``): ``x P_i^T = x[:, perms[i]]``.

    Factor i cuts the features into groups of ``b 2^i`` and reorders each group's half-block chunks
    (b / 2 features) even ones first; factor 0, and every factor of a one-factor BOFT, is the identity."""
    if block_num * block_size != in_features or (factors > 1 and in_features % (block_size * 2 ** (factors - 1))):
        shape = f"{block_num} blocks of {block_size} with {factors} factors"
        raise ValueError(f"{shape} do not tile {in_features} features")
    perms = torch.arange(in_features).repeat(factors, 1)
    if factors == 1:
        return perms
    half = block_size // 2
    for i in range(factors):
        chunks = 2 ** (i + 1)  # half-blocks per group of b 2^i features
        order = torch.cat([torch.arange(0, chunks, 2), torch.arange(1, chunks, 2)])
        grouped = perms[i].view(in_features // (half * chunks), chunks, half)
        perms[i] = grouped[:, order].reshape(-1)
    return perms


def cayley(boft_r: torch.Tensor) -> torch.Tensor:
    """Q = (I - S)(I + S)^-1 with S = (R - R^T) / 2 for R [..., b, b] (PEFT's ``cayley_batch``;
    differentiable, computed in R's dtype)."""
    skew = 0.5 * (boft_r - boft_r.transpose(-1, -2))
    eye = torch.eye(boft_r.shape[-1], dtype=boft_r.dtype, device=boft_r.device).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def group_size(block_size: int, factors: int) -> int:
    """g = b 2^(m-1): the features one group of M's diagonal blocks mixes."""
    return block_size * 2 ** (factors - 1)


def butterfly_product(x: torch.Tensor, q: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """``x M`` for x [rows, in] (differentiable; in the dtype of x and Q): for factor i = m-1 .. 0, gather
    by P_i, multiply each b-block by Q_i [D, b, b], gather back by P_i^T."""
    m, blocks, b, _ = q.shape
    inverse = torch.argsort(perms, dim=1)
    for i in reversed(range(m)):
        w = x[:, inverse[i]].view(-1, blocks, b).transpose(0, 1)  # x P_i, block by block
        x = torch.bmm(w, q[i]).transpose(0, 1).reshape(x.shape)[:, perms[i]]
    return x


def butterfly_blocks(q: torch.Tensor, perms: torch.Tensor, group: int) -> torch.Tensor:
    """M's diagonal blocks [in / g, g, g] (differentiable in Q, in Q's dtype): ``x M`` is x rotated per
    g-group by them (``x_c G_c``, OFT's convention)."""
    in_features = perms.shape[1]
    eye = torch.eye(group, dtype=q.dtype, device=q.device).repeat(1, in_features // group)  # [g, in]
    return butterfly_product(eye, q, perms).view(group, -1, group).transpose(0, 1)


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
