"""A reused buffer per (host thread, device, dtype, stream) that large-M linear ops decode their
weight into.

The decode and the GEMM that reads it run back to back on one stream, so the next op's decode
cannot overwrite it early; a buffer per stream keeps that true for code that uses several streams,
and a buffer per host thread for threads that share a stream (two threads' decodes could otherwise
both land before either GEMM reads). A buffer grows to the largest weight its thread has seen
(8192x28672 bf16: 470 MB) and is kept until the thread's end (autograd's backward
thread on a GPU holds its own).
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()


def _buffers() -> dict[tuple[torch.device, torch.dtype, int], torch.Tensor]:
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    return buffers


def buffer(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A contiguous ``[numel]`` view of this thread's scratch buffer for ``device``/``dtype``/current stream."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, dtype, stream)
    buffers = _buffers()
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buffers.pop(key, None)  # free the old one before allocating the larger
        buf = torch.empty(numel, dtype=dtype, device=device)
        buffers[key] = buf
    return buf[:numel]
