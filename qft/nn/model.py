"""Model-level verbs: quantize_ (swap nn.Linear for QuantLinear), add_adapters, merge/unmerge.

Each verb builds every replacement first and swaps only when all were built, so an error leaves the
model as it was.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from qft.nn.config import LoRAConfig, QuantConfig
from qft.nn.lora import LoRALinear
from qft.nn.oft import OFTConfig, OFTLinear
from qft.nn.quant_linear import QuantLinear

ADAPTER_LAYERS = (LoRALinear, OFTLinear)


def _is_adapter_part(model: nn.Module, name: str) -> bool:
    """True for modules inside an adapter layer (lora_A / lora_B / oft_R), which are never targets."""
    parent, _, leaf = name.rpartition(".")
    return leaf in ("lora_A", "lora_B", "oft_R") and isinstance(model.get_submodule(parent), ADAPTER_LAYERS)


def _swap(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    for name, module in replacements.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, module)


def quantize_(
    model: nn.Module, config: QuantConfig | None = None, filter_fn: Callable[[nn.Module, str], bool] | None = None
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (for which ``filter_fn(module, name)`` is true) by a
    ``QuantLinear`` quantized with ``config``, in place; returns ``model``.

    LoRA adapter layers are never quantized; a LoRALinear's plain base layer is.
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if type(model) is nn.Linear:
        raise ValueError("model is itself an nn.Linear: use QuantLinear.from_linear(model, config)")
    replacements = {
        name: QuantLinear.from_linear(module, config)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and not _is_adapter_part(model, name)
        and (filter_fn is None or filter_fn(module, name))
    }
    _swap(model, replacements)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def oft_layers(model: nn.Module) -> dict[str, OFTLinear]:
    """The model's OFTLinear layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, OFTLinear)}


def add_adapters(
    model: nn.Module, config: LoRAConfig | OFTConfig, quant_config: QuantConfig | None = None
) -> nn.Module:
    """Wrap each target Linear/QuantLinear of ``model`` in a LoRALinear (LoRAConfig) or an OFTLinear
    (OFTConfig), in place; returns ``model``.

    Targets follow PEFT: a module whose name equals, or ends in ``"." + t`` for, some ``t`` in
    ``config.target_modules``. Afterwards only adapter parameters require grad (PEFT's freezing).
    With ``config.init == "loftq"`` the targets must still be full-precision ``nn.Linear``: each is
    quantized with ``quant_config`` and gets LoftQ-initialised adapters.
    """
    return install_adapters(model, build_adapters(model, config, quant_config))


def build_adapters(
    model: nn.Module, config: LoRAConfig | OFTConfig, quant_config: QuantConfig | None = None
) -> dict[str, nn.Module]:
    """The adapter layers ``add_adapters`` would install, by module name, built but not installed:
    ``model`` is not changed (``install_adapters`` does that)."""
    if not isinstance(config, (LoRAConfig, OFTConfig)):
        raise TypeError(f"config must be a LoRAConfig or OFTConfig, got {type(config).__name__}")
    loftq = isinstance(config, LoRAConfig) and config.init == "loftq"
    if loftq and not isinstance(quant_config, QuantConfig):
        raise ValueError("init='loftq' quantizes the targets itself: pass quant_config=QuantConfig(...)")
    targets = {}
    for name, module in model.named_modules():
        if not name or not config.matches(name) or _is_adapter_part(model, name):
            continue
        if isinstance(module, ADAPTER_LAYERS):
            raise ValueError(f"{name} already has an adapter")
        if not isinstance(module, (QuantLinear, nn.Linear)):
            raise TypeError(f"target {name} is a {type(module).__name__}, not a Linear or QuantLinear")
        if loftq and type(module) is not nn.Linear:
            raise ValueError(f"init='loftq' needs the full-precision weight, but {name} is already quantized")
        targets[name] = module
    if not targets:
        raise ValueError(f"no module of the model matches target_modules={list(config.target_modules)}")
    if loftq:
        return {name: LoRALinear.with_loftq(module, config, quant_config, name) for name, module in targets.items()}
    if isinstance(config, OFTConfig):
        return {name: OFTLinear(module, config) for name, module in targets.items()}
    return {name: LoRALinear(module, config, name) for name, module in targets.items()}


def install_adapters(model: nn.Module, layers: dict[str, nn.Module]) -> nn.Module:
    """Swap ``layers`` (from ``build_adapters``) into ``model`` and freeze all but the adapter
    parameters (PEFT's freezing); returns ``model``."""
    _swap(model, layers)
    for param in model.parameters():
        param.requires_grad = False
    for layer in layers.values():
        for name, param in layer.named_parameters():
            param.requires_grad = name.startswith(("lora_A.", "lora_B.", "oft_R."))
    return model


def _adapter_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, ADAPTER_LAYERS)]


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (quantized bases are re-quantized); returns ``model``."""
    for layer in _adapter_layers(model):
        layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo ``merge_adapters``; returns ``model``."""
    for layer in _adapter_layers(model):
        layer.unmerge()
    return model
