"""Pure-torch implementations of every qft op: the CPU execution path and the test oracle.

Each function here fixes the exact arithmetic (order of fp32 roundings) that the Triton and CUDA
kernels must reproduce bit for bit; ``qft/formats.py`` documents the rules.
"""

from __future__ import annotations

import torch

from qft import formats


def _blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """View a flat fp32 tensor as ``[blocks, block_size]``, zero-padding the tail block."""
    pad = -flat.numel() % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def blockwise_absmax(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp32 max |x| of each block of the row-major flattened ``w``: ``[num_blocks]``."""
    return _blocks(w.reshape(-1).float(), block_size).abs().amax(dim=1)


def scale_to_unit(w: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """Scale each block into [-1, 1] exactly as bitsandbytes does: ``[num_blocks, block_size]``.

    Full blocks multiply by the fp32 reciprocal of absmax; a partial tail block divides.
    """
    flat = w.reshape(-1).float()
    n = flat.numel()
    floored = absmax.clamp(min=formats.ABSMAX_FLOOR)
    scaled = _blocks(flat, block_size) * (1.0 / floored).unsqueeze(1)
    tail = n % block_size
    if tail:
        scaled[-1, :tail] = flat[n - tail :] / floored[-1]
    return scaled.clamp_(-1.0, 1.0)


def encode_4bit(scaled: torch.Tensor, fmt: str) -> torch.Tensor:
    """Nibble for each value of ``scaled`` (in [-1, 1]): thresholds strictly below, reordered."""
    position = torch.bucketize(scaled, formats.thresholds(fmt, scaled.device), out_int32=True)
    return formats.encode_order(fmt, scaled.device)[position.long()].to(torch.uint8)


def pack_4bit(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """Pack a flat uint8 nibble tensor two per byte (element 2j high); odd counts padded."""
    if codes.numel() % 2:
        pad = torch.full((1,), formats.get_format(fmt).zero_code, dtype=torch.uint8, device=codes.device)
        codes = torch.cat([codes, pad])
    return (codes[0::2] << 4) | codes[1::2]


# Values per step of the CPU loops: a multiple of every block size, small enough that the
# intermediates stay in cache (4x faster than whole-tensor steps on a 235M-value weight).
_CHUNK = 1 << 20


def quantize_4bit(w: torch.Tensor, block_size: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` (any shape, fp32/fp16/bf16) blockwise to 4 bits.

    Returns ``(packed uint8 [(n + 1) // 2], absmax fp32 [num_blocks])``.
    """
    flat = w.reshape(-1)
    n = flat.numel()
    packed = torch.empty(formats.packed_numel(n), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(formats.num_blocks(n, block_size), dtype=torch.float32, device=w.device)
    for start in range(0, n, _CHUNK):
        x = flat[start : start + _CHUNK].float()
        chunk_absmax = blockwise_absmax(x, block_size)
        scaled = scale_to_unit(x, chunk_absmax, block_size).reshape(-1)[: x.numel()]
        absmax[start // block_size : start // block_size + chunk_absmax.numel()] = chunk_absmax
        packed[start // 2 : start // 2 + formats.packed_numel(x.numel())] = pack_4bit(encode_4bit(scaled, fmt), fmt)
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, block_size: int, fmt: str, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    """Decode ``numel`` values: ``code[q] * absmax`` in fp32, rounded to ``dtype``. Flat output."""
    pairs = formats.byte_pairs(fmt, packed.device)
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    for start in range(0, numel, _CHUNK):
        count = min(_CHUNK, numel - start)
        chunk = packed[start // 2 : start // 2 + formats.packed_numel(count)]
        values = torch.index_select(pairs, 0, chunk.int()).view(torch.float32)
        chunk_absmax = absmax[start // block_size : start // block_size + formats.num_blocks(count, block_size)]
        scaled = _blocks(values, block_size)[: chunk_absmax.numel()] * chunk_absmax.unsqueeze(1)
        out[start : start + count] = scaled.reshape(-1)[:count]  # copy_ rounds to nearest even
    return out


def quantize_nested(absmax: torch.Tensor, nested_block_size: int = formats.NESTED_BLOCK_SIZE):
    """Double-quantize fp32 absmax: ``(codes uint8 [n], absmax2 fp32 [blocks2], offset fp32 [])``.

    Each centred value takes the nearest code of the dynamic map; the choice is made in fp64 so it
    is the true nearest (exact ties, measure zero, take the lower code).
    """
    offset = absmax.mean()
    centred = absmax - offset
    absmax2 = blockwise_absmax(centred, nested_block_size)
    ratio = _blocks(centred.double(), nested_block_size) / absmax2.double().clamp(min=formats.ABSMAX_FLOOR).unsqueeze(1)
    dmap = formats.dynamic_map(absmax.device).double()
    codes = torch.bucketize(ratio.reshape(-1)[: absmax.numel()], (dmap[:-1] + dmap[1:]) / 2)
    return codes.to(torch.uint8), absmax2, offset


def dequantize_nested(
    codes: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, nested_block_size: int = formats.NESTED_BLOCK_SIZE
) -> torch.Tensor:
    """Recover fp32 absmax from double-quant state: ``fl(fl(code8[q] * absmax2) + offset)``."""
    values = formats.dynamic_map(codes.device)[codes.long()]
    scaled = _blocks(values, nested_block_size) * absmax2.unsqueeze(1)
    return scaled.reshape(-1)[: codes.numel()] + offset


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    # fp32 for every storage dtype; float64 stays float64 so gradcheck can run on this path.
    return torch.float64 if dtype == torch.float64 else torch.float32


def quant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    lora_xa: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scaling: float = 0.0,
) -> torch.Tensor:
    """``x @ weight^T + bias + scaling * lora_xa @ lora_B^T`` accumulated in fp32, rounded once to x's dtype.

    ``x`` [M, K]; ``weight`` [N, K], the dequantized base weight in x's dtype (as bitsandbytes
    decodes it); ``lora_xa`` [M, r] and ``lora_B`` [N, r] in any float dtype (fp32 adapters keep
    their precision).
    """
    acc_dtype = _accumulator(x.dtype)
    acc = x.to(acc_dtype) @ weight.to(acc_dtype).t()
    if bias is not None:
        acc += bias.to(acc_dtype)
    if lora_xa is not None:
        acc.addmm_(lora_xa.to(acc_dtype), lora_B.to(acc_dtype).t(), alpha=scaling)
    return acc.to(x.dtype)


def quant_linear_grad_input(
    grad: torch.Tensor,
    weight: torch.Tensor,
    lora_grad_xa: torch.Tensor | None = None,
    lora_A: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_scale: float = 1.0,
) -> torch.Tensor:
    """``grad @ weight + (lora_grad_xa @ lora_A) * mask * dropout_scale`` in fp32, rounded to grad's dtype.

    ``grad`` [M, N]; ``weight`` [N, K] in grad's dtype; ``lora_grad_xa`` [M, r] (the gradient that
    reaches ``dropout(x) @ A^T``, scaling included); ``lora_A`` [r, K]; ``dropout_mask`` [M, K] bool.
    """
    acc_dtype = _accumulator(grad.dtype)
    acc = grad.to(acc_dtype) @ weight.to(acc_dtype)
    if lora_grad_xa is not None:
        lora = lora_grad_xa.to(acc_dtype) @ lora_A.to(acc_dtype)
        if dropout_mask is not None:
            lora *= dropout_mask * dropout_scale
        acc += lora
    return acc.to(grad.dtype)
