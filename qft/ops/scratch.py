"""A reused buffer per (device, dtype, stream) that large-M linear ops decode their weight into.

The decode and the GEMM that reads it run back to back on one stream, so the next op's decode
cannot overwrite it early; a buffer per stream keeps that true for code that uses several streams.
The buffer grows to the largest weight seen (8192x28672 bf16: 470 MB) and is kept; ``release()``
frees it.
"""

from __future__ import annotations

import torch

_buffers: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}


def buffer(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A contiguous ``[numel]`` view of the scratch buffer for ``device``/``dtype``/current stream."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, dtype, stream)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < numel:
        _buffers.pop(key, None)  # free the old one before allocating the larger
        buf = torch.empty(numel, dtype=dtype, device=device)
        _buffers[key] = buf
    return buf[:numel]


def release() -> None:
    """Drop every scratch buffer (their memory returns to torch's allocator)."""
    _buffers.clear()
