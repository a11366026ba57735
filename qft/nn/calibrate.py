"""Calibration statistics for calibrated quantization: ``calibrate(model, batches)`` runs the model on
calibration batches and keeps, for every ``nn.Linear``, ``H = X^T X / n`` of its inputs X [n, K]
(accumulated in fp32 on the layer's device; statistics, never the activations; padding rows count
like any other, as the layer sees them).

A layer that reads the very tensor the previous layer read, unchanged (q/k/v, gate/up), reuses that
layer's ``X^T X`` product instead of computing it again; each layer keeps its own sum, so the statistics
stay right whatever the call order. ``quantize_(model, QuantConfig(method="gptq"), calibration=...)``
reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class Calibration(dict):
    """Module name -> ``X^T X / n`` [K, K] fp32; ``rows`` counts the input rows seen per name."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, int] = {}


def calibrate(
    model: nn.Module,
    batches: Iterable,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    progress: bool = False,
) -> Calibration:
    """Run ``model`` on every batch (``model(**batch)`` for a dict, else ``model(batch)``) without
    gradients and return each ``nn.Linear``'s input statistics (those ``filter_fn(module, name)``
    keeps). The model is unchanged; ``ValueError`` when no batch reaches a chosen layer."""
    chosen = {
        name: m
        for name, m in model.named_modules()
        if type(m) is nn.Linear and (filter_fn is None or filter_fn(m, name))
    }
    if not chosen:
        raise ValueError("the model has no nn.Linear layers to calibrate")
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    last = {"input": None, "version": None, "product": None}  # the previous call's input and its X^T X

    def hook(name):
        def record(module, args):
            x = args[0]
            if last["input"] is not x or last["version"] != x._version:  # not the same, unchanged tensor
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                last.update(input=x, version=x._version, product=flat.t() @ flat)
            if name not in sums:
                sums[name] = torch.zeros_like(last["product"])
                rows[name] = 0
            sums[name] += last["product"]
            rows[name] += x.numel() // x.shape[-1]

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in chosen.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in _progress(batches, progress):
                model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        last.clear()
    result = Calibration()
    for name in chosen:
        if name not in sums:
            raise ValueError(f"no calibration batch reached layer {name!r}")
        result[name], result.rows[name] = sums[name] / rows[name], rows[name]
    return result


def _progress(batches: Iterable, shown: bool):
    if not shown:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc="calibrating", unit="batch")
