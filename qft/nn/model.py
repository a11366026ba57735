"""Model-level verbs: quantize_ (swap nn.Linear for QuantLinear), add_adapters, merge/unmerge.

Adapters are found through ``qft.adapters``' registry (by config type and layer type), so a new kind of
adapter needs no change here. Each verb builds every replacement first and swaps only when all were
built, so an error leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from qft import adapters
from qft.adapters.lora import LoRALinear
from qft.adapters.oft import OFTLinear
from qft.nn.config import QuantConfig
from qft.nn.plan import BitsPlan
from qft.nn.quant_linear import QuantLinear


def _is_adapter_part(model: nn.Module, name: str) -> bool:
    """True for modules inside an adapter layer (lora_A / lora_B / oft_R), which are never targets."""
    parent, _, leaf = name.rpartition(".")
    spec = adapters.spec_for_layer(model.get_submodule(parent))
    return spec is not None and leaf in spec.parts


def _swap(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    for name, module in replacements.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, module)


def quantizable_linears(model: nn.Module, filter_fn=None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers ``quantize_`` takes, by name: not an adapter's own (LoRA's A and B), and
    those ``filter_fn(module, name)`` keeps."""
    return {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and not _is_adapter_part(model, name)
        and (filter_fn is None or filter_fn(module, name))
    }


def _planned(configs: Mapping[str, QuantConfig], name: str) -> QuantConfig | None:
    """A plan's entry for layer ``name``, or for the adapter layer whose plain base it is."""
    if name in configs:
        return configs[name]
    parent, _, leaf = name.rpartition(".")
    return configs.get(parent) if leaf == "base_layer" else None


def quantize_(
    model: nn.Module,
    config: QuantConfig | BitsPlan | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    calibration: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (for which ``filter_fn(module, name)`` is true) by a
    ``QuantLinear`` quantized with ``config``, in place; returns ``model``.

    ``config`` may be a ``BitsPlan`` (``qft.plan_bits``): each layer it names (or an adapter layer's
    plain base, by the adapter layer's name) gets its own QuantConfig, layers it does not name are left
    as they are (``ValueError`` when it names a layer the model does not have). Adapters' own layers (LoRA's A and
    B) are never quantized; an adapter layer's plain base layer is. ``calibration``
    (``qft.nn.calibrate(model, batches)``, taken before quantizing) holds each layer's input
    statistics; method ``"gptq"`` needs it for every layer it quantizes (``ValueError`` naming a
    missing one, before any layer changes).
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, (QuantConfig, BitsPlan)):
        raise TypeError(f"config must be a QuantConfig or a BitsPlan, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if type(model) is nn.Linear:
        raise ValueError("model is itself an nn.Linear: use QuantLinear.from_linear(model, config)")
    chosen = quantizable_linears(model, filter_fn)
    if isinstance(config, BitsPlan):  # a named layer already quantized (by LoftQ or ApiQ) is skipped
        unknown = sorted(set(config.configs) - {name for name, _ in model.named_modules()})
        if unknown:
            raise ValueError(f"the plan names layers this model does not have: {unknown[:3]}")
        planned = {name: _planned(config.configs, name) for name in chosen}  # layers it does not name stay
        configs = {name: c for name, c in planned.items() if c is not None}
    else:
        configs = {name: config for name in chosen}
    gptq = [name for name, c in configs.items() if c.method == "gptq"]
    missing = [name for name in gptq if calibration is None or name not in calibration]
    if missing:
        raise ValueError(f"method 'gptq' needs calibration statistics for {missing[:3]} (qft.nn.calibrate)")
    replacements = {
        name: QuantLinear.from_linear(chosen[name], c, calibration[name] if name in gptq else None)
        for name, c in configs.items()
    }
    _swap(model, replacements)
    return model


def adapter_layers(model: nn.Module, kind: str | None = None) -> dict[str, nn.Module]:
    """The model's adapter layers by module name: all kinds, or only ``kind`` (``"lora"``, ``"oft"``)."""
    found = {}
    for name, module in model.named_modules():
        spec = adapters.spec_for_layer(module)
        if spec is not None and (kind is None or spec.name == kind):
            found[name] = module
    return found


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear layers by module name."""
    return adapter_layers(model, "lora")


def oft_layers(model: nn.Module) -> dict[str, OFTLinear]:
    """The model's OFTLinear layers by module name."""
    return adapter_layers(model, "oft")


def add_adapters(
    model: nn.Module,
    config,
    quant_config: QuantConfig | BitsPlan | None = None,
    calibration: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Wrap each target Linear/QuantLinear of ``model`` in the adapter layer of ``config``'s kind (a
    LoRALinear for a LoRAConfig, an OFTLinear for an OFTConfig), in place; returns ``model``.

    Targets follow PEFT: a module whose name equals, or ends in ``"." + t`` for, some ``t`` in
    ``config.target_modules``. Afterwards only adapter parameters require grad (PEFT's freezing).
    With ``LoRAConfig(init="loftq")`` or ``init="apiq"`` the targets must still be full-precision
    ``nn.Linear``: each is quantized with ``quant_config`` (a BitsPlan: its entry for the layer) and gets
    LoftQ- or ApiQ-initialised adapters.
    ``calibration`` (``qft.nn.calibrate``) holds the targets' input statistics, which ApiQ and a
    QuantConfig with method ``"gptq"`` need (``ValueError`` naming a missing layer, before any change).
    """
    return install_adapters(model, build_adapters(model, config, quant_config, calibration))


def build_adapters(
    model: nn.Module,
    config,
    quant_config: QuantConfig | BitsPlan | None = None,
    calibration: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, nn.Module]:
    """The adapter layers ``add_adapters`` would install, by module name, built but not installed:
    ``model`` is not changed (``install_adapters`` does that)."""
    spec = adapters.spec_for_config(config)
    if spec is None:
        kinds = " or ".join(s.config_type.__name__ for s in adapters.specs())
        raise TypeError(f"config must be a {kinds}, got {type(config).__name__}")
    quantizing = spec.quantizing_init(config)
    if quantizing and not isinstance(quant_config, (QuantConfig, BitsPlan)):
        raise ValueError(f"{quantizing} quantizes the targets itself: pass quant_config=QuantConfig(...)")
    targets = {}
    for name, module in model.named_modules():
        if not name or not config.matches(name) or _is_adapter_part(model, name):
            continue
        if adapters.spec_for_layer(module) is not None:
            raise ValueError(f"{name} already has an adapter")
        if not isinstance(module, (QuantLinear, nn.Linear)):
            raise TypeError(f"target {name} is a {type(module).__name__}, not a Linear or QuantLinear")
        if quantizing and type(module) is not nn.Linear:
            raise ValueError(f"{quantizing} needs the full-precision weight, but {name} is already quantized")
        targets[name] = module
    if not targets:
        raise ValueError(f"no module of the model matches target_modules={list(config.target_modules)}")
    quantize = adapters.QuantizeWith(quant_config, QuantLinear, calibration) if quantizing else None
    return {name: spec.make_layer(module, config, name, quantize) for name, module in targets.items()}


def install_adapters(model: nn.Module, layers: dict[str, nn.Module]) -> nn.Module:
    """Swap ``layers`` (from ``build_adapters``) into ``model`` and freeze all but the adapter
    parameters (PEFT's freezing); returns ``model``."""
    _swap(model, layers)
    for param in model.parameters():
        param.requires_grad = False
    for layer in layers.values():
        parts = adapters.spec_for_layer(layer).layer_parts(layer)
        for name, param in layer.named_parameters():
            param.requires_grad = name.split(".", 1)[0] in parts
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (quantized bases are re-quantized); returns ``model``."""
    for layer in adapter_layers(model).values():
        layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo ``merge_adapters``; returns ``model``."""
    for layer in adapter_layers(model).values():
        layer.unmerge()
    return model
