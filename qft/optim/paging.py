"""Managed (unified) memory for optimizer state on a GPU, through ``qft._C`` (no torch headers).

``managed_zeros`` allocates with cudaMallocManaged and hands the memory to torch through
``__cuda_array_interface__`` (the tensor keeps its owner alive); ``prefetch`` moves a tensor's pages
to the GPU or to the host. An allocation larger than the card's free memory is refused: managed
memory that oversubscribes a GPU can stall it.
"""

from __future__ import annotations

import torch

from qft._extension import extension
from qft.ops import cuda_calls

_TYPESTR = {torch.float32: "<f4", torch.uint8: "|u1", torch.float16: "<f2", torch.int32: "<i4"}


def available() -> bool:
    """True when the CUDA extension is built and sees a GPU."""
    return extension().usable


class ManagedBuffer:
    """A managed allocation of ``numel`` elements of ``dtype``, freed when the last tensor over it goes."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        if dtype not in _TYPESTR:
            raise TypeError(f"managed buffers hold {sorted(map(str, _TYPESTR))}, not {dtype}")
        nbytes = max(1, numel * torch.tensor([], dtype=dtype).element_size())
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes > free:
            raise MemoryError(f"refusing {nbytes} bytes of managed memory: the GPU has {free} bytes free")
        self._free = cuda_calls.managed_free  # held: module globals may be gone at exit
        self.address = cuda_calls.managed_alloc(nbytes)
        self.numel, self.dtype, self.nbytes = numel, dtype, nbytes

    @property
    def __cuda_array_interface__(self) -> dict:
        return {
            "shape": (self.numel,),
            "typestr": _TYPESTR[self.dtype],
            "data": (self.address, False),
            "version": 3,
            "strides": None,
        }

    def __del__(self) -> None:
        if getattr(self, "address", 0):
            self._free(self.address)
            self.address = 0


def managed_zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled CUDA tensor over managed memory."""
    numel = 1
    for d in shape:
        numel *= d
    with torch.cuda.device(device):
        tensor = torch.as_tensor(ManagedBuffer(numel, dtype, device), device=device).view(shape)
    return tensor.zero_()


def check_fits(tensors: list[torch.Tensor]) -> None:
    """``MemoryError`` when the managed ``tensors`` (on one GPU each) need more bytes than their GPUs
    have free: prefetching them there would oversubscribe the card."""
    need: dict[torch.device, int] = {}
    for t in tensors:
        need[t.device] = need.get(t.device, 0) + t.numel() * t.element_size()
    for device, nbytes in need.items():
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes > free:
            raise MemoryError(f"refusing to page in {nbytes} bytes of optimizer state: {device} has {free} bytes free")


def prefetch(tensor: torch.Tensor, to_host: bool) -> bool:
    """Move a managed tensor's pages to the host or to its GPU; False where the GPU cannot prefetch."""
    device = -1 if to_host else tensor.device.index
    stream = torch.cuda.current_stream(tensor.device).cuda_stream
    nbytes = tensor.numel() * tensor.element_size()
    return cuda_calls.managed_prefetch(tensor.data_ptr(), nbytes, device, stream)
