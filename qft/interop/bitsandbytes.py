"""bitsandbytes' layouts: its packed bytes + ``QuantState`` <-> QuantizedTensor, and the state-dict
entries of its ``Linear4bit`` that ``QuantLinear`` reads and writes.

``Linear4bit`` keys: ``weight`` (packed [n/2, 1]), ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map`` and ``weight.quant_state.bitsandbytes__<fmt>``
(JSON: quant_type, blocksize, dtype, shape, nested_blocksize, nested_offset). Formats bitsandbytes
lacks use the same layout with ``weight.zero`` (affine) and a ``weight.quant_state.qft__<fmt>`` entry.
bitsandbytes itself is imported only by ``to_bnb`` (reading a QuantState needs only its attributes).
"""

from __future__ import annotations

import json

import torch

from qft import formats
from qft.formats.parts import STATE_KEYS
from qft.tensor import QuantizedTensor, check_finite_scales

BNB_BLOB = "weight.quant_state.bitsandbytes__"
QFT_BLOB = "weight.quant_state.qft__"
# Linear4bit's entry of each stored part: the codes are "weight", the others "weight.<their state-dict key>"
# (the offset travels in the JSON blob).
PART_KEYS = {
    name: "weight" if name == "codes" else f"weight.{key}" for name, key in STATE_KEYS.items() if name != "offset"
}
# A layer's state-dict entries besides its quant-state blob.
STATE_ENTRIES = (*PART_KEYS.values(), "weight.quant_map", "weight.nested_quant_map")


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


def _as_bytes(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # bitsandbytes' quant_storage may be any dtype over the same bytes
    return (packed if packed.dtype == dtype else packed.contiguous().view(dtype)).reshape(-1)


def from_bnb(cls, packed: torch.Tensor, quant_state) -> QuantizedTensor:
    """Build ``cls`` (QuantizedTensor) over bitsandbytes' packed bytes and QuantState, sharing data."""
    for attr in ("absmax", "shape", "blocksize", "quant_type", "dtype", "code"):
        if not hasattr(quant_state, attr):
            raise TypeError(f"quant_state must be a bitsandbytes QuantState; it has no {attr!r}")
    fmt = quant_state.quant_type
    formats.get_bnb_format(fmt)
    if not _same_table(quant_state.code, formats.code(fmt)):
        raise ValueError(f"quant_state.code is not the standard {fmt} code book; qft cannot decode it")
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a tensor, got {type(packed).__name__}")
    parts = {"codes": _as_bytes(packed, torch.uint8), "scales": quant_state.absmax}
    nested_block_size = formats.NESTED_BLOCK_SIZE
    if getattr(quant_state, "state2", None) is not None:
        state2 = quant_state.state2
        if not _same_table(state2.code, formats.dynamic_map()):
            raise ValueError("quant_state.state2.code is not the signed 8-bit dynamic map")
        offset = quant_state.offset
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
        parts.update(nested_scales=state2.absmax, offset=offset.to(torch.float32).reshape(()))
        nested_block_size = int(state2.blocksize)
    shape = torch.Size(quant_state.shape)
    return cls(parts, shape, quant_state.dtype, fmt, int(quant_state.blocksize), nested_block_size)


def to_bnb(qt: QuantizedTensor):
    """``(packed uint8 [n/2, 1], QuantState)`` for bitsandbytes, sharing ``qt``'s tensors."""
    formats.get_bnb_format(qt.format)
    bnb_functional = _bnb_functional()
    device = qt.device
    state2 = None
    if qt.double_quant:
        state2 = bnb_functional.QuantState(
            absmax=qt.nested_scales,
            code=formats.dynamic_map(device).clone(),
            blocksize=qt.nested_block_size,
            dtype=torch.float32,
        )
    state = bnb_functional.QuantState(
        absmax=qt.scales,
        shape=torch.Size(qt.shape),
        code=formats.code(qt.format, device).clone(),
        blocksize=qt.block_size,
        quant_type=qt.format,
        dtype=qt.dtype,
        offset=qt.offset,
        state2=state2,
    )
    return qt.codes.view(-1, 1), state


def linear4bit_state(qt: QuantizedTensor, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """``qt`` as ``Linear4bit`` state-dict entries (without the module prefix)."""
    detach = (lambda t: t) if keep_vars else (lambda t: t.detach())
    state = {PART_KEYS[name]: detach(t) for name, t in qt.parts.items() if name in PART_KEYS}
    state["weight"] = state["weight"].view(-1, 1)
    meta = {
        "quant_type": qt.format,
        "blocksize": qt.block_size,
        "dtype": str(qt.dtype).removeprefix("torch."),
        "shape": list(qt.shape),
    }
    if not formats.get_format(qt.format).affine:
        state["weight.quant_map"] = formats.code(qt.format, qt.device).clone()
    if qt.double_quant:
        state["weight.nested_quant_map"] = formats.dynamic_map(qt.device).clone()
        offset = 0.0 if qt.offset.is_meta else qt.offset.item()  # a skeleton (meta) before loading
        meta.update(nested_blocksize=qt.nested_block_size, nested_dtype="float32", nested_offset=offset)
    blob = BNB_BLOB if formats.is_bnb_codebook(qt.format) else QFT_BLOB
    state[blob + qt.format] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return state


def is_linear4bit_key(key: str) -> bool:
    """True for a layer's weight entries in this layout (the parts, the maps, the quant-state blob)."""
    return key in STATE_ENTRIES or key.startswith((BNB_BLOB, QFT_BLOB))


def layer_entries() -> list[str]:
    """Every entry name a quantized layer can have in this layout, quant-state blobs of all formats."""
    blobs = [(BNB_BLOB if formats.is_bnb_codebook(f) else QFT_BLOB) + f for f in formats.FORMATS]
    return [*STATE_ENTRIES, *blobs]


def quant_state_blobs(state, prefix: str) -> list[str]:
    """The keys of ``state`` that hold a quant-state blob under ``prefix``."""
    return [k for k in state if k.startswith((prefix + BNB_BLOB, prefix + QFT_BLOB))]


def from_linear4bit_state(state, prefix: str, shape: tuple[int, int]) -> QuantizedTensor:
    """A QuantizedTensor from ``Linear4bit`` entries under ``prefix``; ``ValueError`` when they do not
    describe a ``shape`` weight in a known format with standard tables."""
    blobs = quant_state_blobs(state, prefix)
    if len(blobs) != 1:
        raise ValueError(f"expected one 'weight.quant_state.<library>__<format>' entry, found {len(blobs)}")
    meta = json.loads(bytes(state[blobs[0]].cpu().tolist()).decode())
    fmt = meta["quant_type"]
    spec = formats.get_format(fmt)
    if tuple(meta["shape"]) != tuple(shape):
        raise ValueError(f"checkpoint weight has shape {tuple(meta['shape'])}, this layer is {tuple(shape)}")
    if not spec.affine and not torch.equal(state[prefix + "weight.quant_map"].float().cpu(), formats.code(fmt)):
        raise ValueError(f"weight.quant_map is not the standard {fmt} code book")
    nested = prefix + "weight.nested_absmax" in state
    if nested and not torch.equal(state[prefix + "weight.nested_quant_map"].float().cpu(), formats.dynamic_map()):
        raise ValueError("weight.nested_quant_map is not the signed 8-bit dynamic map")
    dtype = getattr(torch, str(meta["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {meta['dtype']!r}")
    parts = {name: state[prefix + key] for name, key in PART_KEYS.items() if prefix + key in state}
    parts["codes"] = _as_bytes(parts["codes"], formats.packed_dtype(spec.bits))
    if nested:
        device = parts["codes"].device
        parts["offset"] = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=device)
    block_size = int(meta["blocksize"])
    nested_block_size = int(meta.get("nested_blocksize", formats.NESTED_BLOCK_SIZE))
    qt = QuantizedTensor(parts, torch.Size(shape), dtype, fmt, block_size, nested_block_size)
    return check_finite_scales(qt)
