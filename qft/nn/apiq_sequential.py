"""ApiQ's block-wise aim, sequentially: keep the quantized model's outputs close to the full-precision
model's through the stack, not each layer's on its own inputs (Liao & Monz 2024, "ApiQ", section 3.2:
errors of earlier quantized layers reach later ones).

Layer-wise ApiQ (``LoRAConfig(init="apiq")`` with ``calibrate``'s statistics) fits each layer to
``min ||X W^T - X M^T||`` with M = Q + s B A, X the full-precision model's inputs to that layer. Here the
layers are quantized in order, and each is fitted on the inputs ``X_q`` that the already-quantized layers
before it produce, against the full-precision layer's outputs on the full-precision inputs ``X``:
``min ||X W^T - X_q M^T||``. With ``C = X^T X_q / n`` and ``H_q = X_q^T X_q / n`` that is
``||X_q (W' - M)^T||^2`` plus a constant, ``W' = W C H_q^-1 = W + W (C - H_q) H_q^-1``: layer-wise
ApiQ of ``W'`` under ``H_q`` (the correction solved with GPTQ's damping on H_q, so that directions the
calibration inputs barely visit keep W).
ApiQ descends a whole block's output by gradients; this needs one pass over the calibration batches
per target layer and no learning rate.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn

from qft import adapters
from qft.adapters.lora import LoRAConfig
from qft.formats.gptq import DAMP, damped
from qft.nn.config import QuantConfig
from qft.nn.model import install_adapters
from qft.nn.plan import BitsPlan
from qft.nn.quant_linear import QuantLinear


def _inputs(model: nn.Module, name: str, batch) -> torch.Tensor:
    """Module ``name``'s input on ``batch`` as [rows, K] fp32 (no rows when the batch never reaches it)."""
    seen = []
    module = model.get_submodule(name)
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        handle.remove()
    if not seen:
        return torch.zeros(0, module.in_features, device=module.weight.device)
    return torch.cat([x.reshape(-1, x.shape[-1]).float() for x in seen])


@torch.no_grad()
def apiq_sequential(
    model: nn.Module,
    config: LoRAConfig,
    quant_config: QuantConfig | BitsPlan,
    batches: Iterable,
    damp: float = DAMP,
    progress: Callable[[str], None] | None = None,
) -> nn.Module:
    """Quantize ``model``'s LoRA targets (full-precision ``nn.Linear``, ``config.target_modules``) one at a
    time in module order, each with ApiQ's init fitted to keep the full-precision outputs from the inputs
    the quantized layers before it produce (see the module text); returns ``model``, adapted in place.

    ``config.init`` must be ``"apiq"``; ``batches``: calibration inputs (``model(**batch)`` for a dict,
    else ``model(batch)``), kept in memory (one pass per target). A full-precision copy of the model is
    held meanwhile (twice the model's memory). ``progress(name)`` is called as each layer starts. Raises
    ``ValueError`` before any change when a target is not a full-precision Linear; on any failure the
    original layers are put back.
    """
    if not isinstance(config, LoRAConfig) or config.init != "apiq":
        raise ValueError("apiq_sequential takes a LoRAConfig with init='apiq'")
    if not isinstance(quant_config, (QuantConfig, BitsPlan)):
        raise TypeError(f"quant_config must be a QuantConfig or a BitsPlan, got {type(quant_config).__name__}")
    batches = list(batches)
    if not batches:
        raise ValueError("apiq_sequential needs at least one calibration batch")
    targets = [name for name, m in model.named_modules() if name and config.matches(name)]
    bad = [name for name in targets if type(model.get_submodule(name)) is not nn.Linear]
    if bad or not targets:
        raise ValueError(f"apiq_sequential needs full-precision nn.Linear targets, got {bad[:3] or 'none'}")
    reference = copy.deepcopy(model).eval()
    was_training = model.training
    model.eval()
    spec = adapters.spec_for_config(config)
    built, originals = {}, {}
    try:
        for name in targets:
            if progress is not None:
                progress(name)
            linear = model.get_submodule(name)
            k = linear.in_features
            cross = torch.zeros(k, k, device=linear.weight.device)
            hessian = torch.zeros(k, k, device=linear.weight.device)
            rows = 0
            for batch in batches:
                x, x_q = _inputs(reference, name, batch), _inputs(model, name, batch)
                cross += x.t() @ x_q
                hessian += x_q.t() @ x_q
                rows += x_q.shape[0]
            if rows == 0:
                raise ValueError(f"no calibration batch reached layer {name!r}")
            cross, hessian = cross / rows, hessian / rows
            # W' = W C H_q^-1 = W + W (C - H_q) H_q^-1, the damping on the correction only: a direction the
            # calibration inputs barely visit keeps W there, rather than shrinking it towards zero
            w = linear.weight.double()
            correction = torch.linalg.solve(damped(hessian.double(), damp), (w @ (cross - hessian).double()).t()).t()
            target = w + correction
            has_bias, device, dtype = linear.bias is not None, linear.weight.device, linear.weight.dtype
            stand_in = nn.Linear(k, linear.out_features, has_bias, device, dtype)
            stand_in.weight.copy_(target.to(dtype))
            if has_bias:
                stand_in.bias.copy_(linear.bias)
            quantize = adapters.QuantizeWith(quant_config, QuantLinear, {name: hessian})
            layer = spec.make_layer(stand_in, config, name, quantize)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, layer)
            built[name], originals[name] = layer, linear
    except BaseException:
        for name, linear in originals.items():  # nothing half-changed: the very layers that were there
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, linear)
        raise
    finally:
        model.train(was_training)
    return install_adapters(model, built)
