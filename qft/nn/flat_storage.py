"""One byte buffer for all parts of a quantized weight, so FSDP2 can shard and all-gather them as a
single parameter (``QuantLinear.to_flat_storage``).

Each part starts at a multiple of ``ALIGN`` bytes, so after an all-gather every part is a view of
its own dtype into the buffer (no copy). FSDP2 all-gathers parameters of different dtypes as bytes,
so a uint8 buffer shards next to fp32/bf16 adapter parameters with no float "storage dtype".
"""

from __future__ import annotations

from typing import NamedTuple

import torch

ALIGN = 16  # bytes: any part's dtype divides it


class Slot(NamedTuple):
    """Where one part lives in the buffer."""

    name: str
    offset: int  # bytes
    dtype: torch.dtype
    shape: tuple[int, ...]


def pack(parts: dict[str, torch.Tensor | None]) -> tuple[torch.Tensor, tuple[Slot, ...]]:
    """``(uint8 buffer, layout)`` holding every non-None part of ``parts`` (all on one device)."""
    present = {name: t for name, t in parts.items() if t is not None}
    layout, offset = [], 0
    for name, t in present.items():
        layout.append(Slot(name, offset, t.dtype, tuple(t.shape)))
        offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    device = next(iter(present.values())).device
    buffer = torch.zeros(offset, dtype=torch.uint8, device=device)
    for slot in layout:
        t = present[slot.name].contiguous()
        nbytes = t.numel() * t.element_size()
        buffer[slot.offset : slot.offset + nbytes] = t.reshape(-1).view(torch.uint8)
    return buffer, tuple(layout)


def unpack(buffer: torch.Tensor, layout: tuple[Slot, ...]) -> dict[str, torch.Tensor]:
    """Views of each part into ``buffer`` (the whole, unsharded buffer)."""
    parts = {}
    for slot in layout:
        numel = 1
        for size in slot.shape:
            numel *= size
        nbytes = numel * torch.empty((), dtype=slot.dtype).element_size()
        parts[slot.name] = buffer[slot.offset : slot.offset + nbytes].view(slot.dtype).view(slot.shape)
    return parts
