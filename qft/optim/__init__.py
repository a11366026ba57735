"""Optimizers with 32-bit or 8-bit state that can page to host memory."""

from qft.optim.adamw import AdamW8bit, PagedAdamW, PagedAdamW8bit

__all__ = ["AdamW8bit", "PagedAdamW", "PagedAdamW8bit"]
