"""Exchange 4-bit weights with bitsandbytes: its packed bytes + ``QuantState`` <-> QuantizedTensor.

bitsandbytes is imported only by ``to_bnb`` (reading a QuantState needs only its attributes).
"""

from __future__ import annotations

import torch

from qft import formats


def _bnb_functional():
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as exc:
        raise ImportError(
            "QuantizedTensor.to_bnb needs bitsandbytes, which is not installed (pip install bitsandbytes)"
        ) from exc
    return bnb_functional


def _same_table(table: torch.Tensor, expected: torch.Tensor) -> bool:
    return (
        isinstance(table, torch.Tensor) and table.shape == expected.shape and torch.equal(table.float().cpu(), expected)
    )


def from_bnb(cls, packed: torch.Tensor, quant_state):
    """Build ``cls`` (QuantizedTensor) over bitsandbytes' packed bytes and QuantState, sharing data."""
    for attr in ("absmax", "shape", "blocksize", "quant_type", "dtype", "code"):
        if not hasattr(quant_state, attr):
            raise TypeError(f"quant_state must be a bitsandbytes QuantState; it has no {attr!r}")
    fmt = quant_state.quant_type
    formats.get_4bit_format(fmt)
    if not _same_table(quant_state.code, formats.code(fmt)):
        raise ValueError(f"quant_state.code is not the standard {fmt} code book; qft cannot decode it")
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage may be any dtype over the same bytes
        packed = packed.contiguous().view(torch.uint8)
    nested_absmax = offset = None
    nested_block_size = formats.NESTED_BLOCK_SIZE
    if getattr(quant_state, "state2", None) is not None:
        state2 = quant_state.state2
        if not _same_table(state2.code, formats.dynamic_map()):
            raise ValueError("quant_state.state2.code is not the signed 8-bit dynamic map")
        nested_absmax = state2.absmax
        nested_block_size = int(state2.blocksize)
        offset = quant_state.offset
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
    return cls(
        packed=packed.reshape(-1), absmax=quant_state.absmax, nested_absmax=nested_absmax,
        offset=None if offset is None else offset.to(torch.float32).reshape(()),
        shape=torch.Size(quant_state.shape), dtype=quant_state.dtype, format=fmt,
        block_size=int(quant_state.blocksize), nested_block_size=nested_block_size,
    )  # fmt: skip


def to_bnb(qt):
    """``(packed uint8 [n/2, 1], QuantState)`` for bitsandbytes, sharing ``qt``'s tensors."""
    formats.get_4bit_format(qt.format)
    bnb_functional = _bnb_functional()
    device = qt.device
    state2 = None
    if qt.double_quant:
        state2 = bnb_functional.QuantState(
            absmax=qt.nested_absmax, code=formats.dynamic_map(device).clone(),
            blocksize=qt.nested_block_size, dtype=torch.float32,
        )  # fmt: skip
    state = bnb_functional.QuantState(
        absmax=qt.absmax, shape=torch.Size(qt.shape), code=formats.code(qt.format, device).clone(),
        blocksize=qt.block_size, quant_type=qt.format, dtype=qt.dtype, offset=qt.offset, state2=state2,
    )  # fmt: skip
    return qt.packed.view(-1, 1), state
