"""Device copies of the formats' constant tables, made once per device: kernels read them on
every call, and a copy per launch would cost a transfer."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=128)
def _cached(build, key, device: torch.device) -> torch.Tensor:
    return (build(key) if key is not None else build()).to(device)


def on_device(build, device: torch.device | str, key=None) -> torch.Tensor:
    """``build(key)`` (or ``build()``), a CPU tensor, copied to ``device`` once and then reused."""
    return _cached(build, key, device if isinstance(device, torch.device) else torch.device(device))
