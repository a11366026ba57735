"""GPTQ checkpoints (``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``) as qft int4/3/2 weights."""

from __future__ import annotations

import torch

from qft.interop.affine import affine_format, affine_weight
from qft.tensor import QuantizedTensor


def unpack_gptq_columns(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """GPTQ's packing along dim 0 of an int32 [rows * bits / 32, cols] tensor -> int64 [rows, cols].

    4- and 2-bit: 32/bits values per word, value i at bits ``bits * i``. 3-bit: 32 values in three
    words, 10-1-10-1-10: values 0-9 in word 0, value 10 split (low 2 bits at the top of word 0, high
    bit at the bottom of word 1), values 11-20 in word 1, value 21 split (low bit at the top of word 1,
    high 2 bits at the bottom of word 2), values 22-31 in word 2.
    """
    w = words.to(torch.int64) & 0xFFFFFFFF
    if bits in (4, 2):
        per = 32 // bits
        shifts = (bits * torch.arange(per, device=w.device)).view(1, per, 1)
        return ((w.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1, w.shape[1])[:rows]
    if bits != 3:
        raise ValueError(f"GPTQ {bits}-bit packing is not supported (4, 3, 2)")
    w = w.view(-1, 3, w.shape[1])
    w0, w1, w2 = w[:, 0], w[:, 1], w[:, 2]
    take = lambda word, first, n: [(word >> (3 * i + first)) & 7 for i in range(n)]
    values = take(w0, 0, 10)
    values.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
    values += take(w1, 1, 10)
    values.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
    values += take(w2, 2, 10)
    return torch.stack(values, 1).reshape(-1, w.shape[2])[:rows]


def from_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    zero_offset: int = 1,
) -> tuple[QuantizedTensor, torch.Tensor | None]:
    """GPTQ tensors (``qweight`` int32 [in*bits/32, out], ``qzeros`` int32 [groups, out*bits/32],
    ``scales`` fp16 [groups, out]) as a qft int4/3/2 weight: ``(qt [out, in], input_perm)``.

    ``zero_offset``: GPTQ's original checkpoints store zero - 1 (decode adds 1); ``gptq_v2`` ones
    store the zero itself (pass 0). With an act-order ``g_idx`` (input channels of one group spread
    over the row) the stored columns are sorted by group and ``input_perm`` (their original indices)
    is returned: build the layer with ``QuantLinear(qt, bias, input_perm=input_perm)``. Otherwise
    ``input_perm`` is None.
    """
    affine_format(bits, group_size)
    groups, out_features = scales.shape
    in_features = groups * group_size
    codes = unpack_gptq_columns(qweight, bits, in_features)  # [in, out]
    perm = None
    if g_idx is not None:
        if g_idx.numel() != in_features:
            raise ValueError(f"g_idx must have {in_features} entries, got {g_idx.numel()}")
        g_idx = g_idx.to(torch.int64)
        if not torch.equal(g_idx, torch.arange(in_features, device=g_idx.device) // group_size):
            perm = torch.argsort(g_idx, stable=True)
            counts = torch.bincount(g_idx, minlength=groups)
            if counts.numel() != groups or not bool((counts == group_size).all()):
                raise ValueError(f"every group of g_idx must hold {group_size} input channels")
            codes = codes.index_select(0, perm)  # columns sorted by group: groups become contiguous
    zeros = unpack_gptq_columns(qzeros.t().contiguous(), bits, out_features).t() + zero_offset  # [groups, out]
    # qft groups run along each output row: group (n, k // group_size) -> n * groups + k // group_size.
    qt = affine_weight(codes.t(), scales.t(), zeros.t(), (out_features, in_features), scales.dtype, bits, group_size)
    return qt, perm
