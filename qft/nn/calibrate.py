"""Calibration statistics for calibrated quantization: ``calibrate(model, batches)`` runs the model on
calibration batches and keeps, for every ``nn.Linear``, ``H = X^T X / n`` of its inputs X [n, K]
(accumulated in fp32 on the layer's device; statistics, never the activations).

Layers that read the very same input tensor (q/k/v, gate/up) share one accumulator, so a model holds
one K x K matrix per distinct input. ``quantize_(model, QuantConfig(method="gptq"), calibration=...)``
reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class Calibration(dict):
    """Module name -> ``X^T X / n`` [K, K] fp32 (layers sharing an input share the tensor); ``rows``
    counts the input rows seen per name."""

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
    shared: dict[str, str] = {}  # a layer -> the layer whose accumulator it shares
    last = {"input": None, "name": None}

    def hook(name):
        def record(module, args):
            x = args[0]
            if last["input"] is x and last["name"] is not None:  # the same tensor as the previous layer's
                shared[name] = shared.get(last["name"], last["name"])
                return
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
                rows[name] = 0
            sums[name].addmm_(flat.t(), flat)
            rows[name] += flat.shape[0]
            last["input"], last["name"] = x, name

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in chosen.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in _progress(batches, progress):
                model(**batch) if isinstance(batch, dict) else model(batch)
                last["input"] = last["name"] = None
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    result = Calibration()
    for name in chosen:
        owner = shared.get(name, name)
        if owner not in sums:
            raise ValueError(f"no calibration batch reached layer {name!r}")
        if owner == name:
            sums[name] /= rows[name]
        result[name], result.rows[name] = sums[owner], rows[owner]
    return result


def _progress(batches: Iterable, shown: bool):
    if not shown:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc="calibrating", unit="batch")
