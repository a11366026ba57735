"""Adapters: one subpackage per kind (``lora/``, ``oft/``), each registering an ``AdapterSpec``.

``qft.nn``'s verbs (``add_adapters``, save/load, merge, FSDP units) and the demo find an adapter here
by its config type, layer type, PEFT type or name, never by importing it, so a new kind touches only
its own folder: ``layer.py`` (config and module), ``function.py`` (math and autograd) and
``__init__.py`` (PEFT mapping, demo options, ``register``). Subpackages are found by scanning this
package at import.

Adapters sit below ``qft.nn``: a layer takes its base duck-typed, as an ``nn.Linear`` or as a
quantized layer (``qft.nn.QuantLinear``: ``quantized``, ``bias``, ``input_perm``, ``permute_input``,
``dequantize``, ``set_weight``), and an init that quantizes its target itself (LoftQ) gets the means
to build the base from ``qft.nn`` (``QuantizeWith``).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qft.tensor import QuantizedTensor


@dataclass(frozen=True)
class QuantizeWith:
    """How an init that quantizes a full-precision target itself (LoftQ, ApiQ) stores the weight.

    Attributes:
        config: a ``qft.QuantConfig`` (read: ``format``, ``block_size``, ``double_quant``, ``method``,
            ``act_order``), or a ``qft.nn.BitsPlan`` holding one per module name (``configs``).
        wrap: ``wrap(qt, bias)`` builds the quantized base layer (a ``QuantLinear``) over the result.
        hessians: calibration statistics by module name (``qft.nn.calibrate``), or None.
    """

    config: Any
    wrap: Callable[[QuantizedTensor, torch.Tensor | None], nn.Module]
    hessians: Any = None

    def config_for(self, name: str):
        """Module ``name``'s QuantConfig: the plan's entry for it, or the one config; ``ValueError`` when a
        plan has none."""
        configs = getattr(self.config, "configs", None)
        if configs is None:
            return self.config
        if name not in configs:
            raise ValueError(f"the bits plan has no format for {name!r}")
        return configs[name]

    def hessian(self, name: str) -> torch.Tensor | None:
        """Module ``name``'s ``X^T X / n``, or None when no statistics were given."""
        return None if self.hessians is None else self.hessians.get(name)


def _no_quantizing_init(config) -> None:
    return None


def _no_report(config) -> dict:
    return {}


@dataclass(frozen=True)
class AdapterSpec:
    """One kind of adapter as qft's verbs see it.

    Attributes:
        name: short name, the demo's ``--adapter`` value (``"lora"``).
        config_type / layer_type: the frozen config users hold and the module ``add_adapters`` installs
            (the layer keeps its config as ``.config``, and ``merge()`` / ``unmerge()``).
        parts: the layer's submodules holding trained ``weight`` s (``("lora_A", "lora_B")``): the only
            parameters left trainable, never targets themselves, saved under PEFT's keys
            ``base_model.model.<module>.<part>.weight``.
        peft_type: PEFT's ``peft_type`` in ``adapter_config.json``.
        to_peft(config): the PEFT-specific fields of ``adapter_config.json`` (qft adds the common ones).
        from_peft(raw): the config from PEFT's ``adapter_config.json`` dict; ``KeyError`` / ``ValueError``
            / ``TypeError`` when it is unusable.
        build(base, config, name, quantize): the layer over target ``name``; ``quantize`` is a
            ``QuantizeWith`` when ``quantizing_init(config)``, else None. Left out (None): the layer
            type called with ``(base, config)``.
        quantizing_init(config): None, or how the config names an init that quantizes a full-precision
            target itself (``"init='loftq'"``): its targets must be ``nn.Linear`` and ``add_adapters``
            needs a QuantConfig.
        demo_config(targets, rank, block_size, init): the demo's config (options it does not take raise
            ``ValueError``); demo_lr: the demo's learning rate; demo_report(config): extra report rows.
        bare_parts: the parts are the layer's own parameters, saved as ``<module>.<part>`` without
            ``.weight`` (PEFT's HRA keeps ``hra_u`` so).
        optional_parts: parameters some configs add (LoRA's IEC ``lora_iec``): trained and saved, as
            ``<module>.<part>``, when the layer holds one (``layer_parts``).
    """

    name: str
    config_type: type
    layer_type: type
    parts: tuple[str, ...]
    peft_type: str
    to_peft: Callable[[Any], dict]
    from_peft: Callable[[dict], Any]
    demo_config: Callable[..., Any]
    demo_lr: float
    demo_report: Callable[[Any], dict] = _no_report
    quantizing_init: Callable[[Any], str | None] = _no_quantizing_init
    bare_parts: bool = False
    optional_parts: tuple[str, ...] = ()
    build: Callable[[nn.Module, Any, str, QuantizeWith | None], nn.Module] | None = None

    def make_layer(self, base: nn.Module, config, name: str, quantize: QuantizeWith | None) -> nn.Module:
        """The adapter layer over target ``name`` (``build``, or the layer type over ``(base, config)``)."""
        if self.build is None:
            return self.layer_type(base, config)
        return self.build(base, config, name, quantize)

    def layer_parts(self, layer: nn.Module) -> tuple[str, ...]:
        """The parts ``layer`` trains: ``parts``, and the optional parts it holds."""
        return self.parts + tuple(p for p in self.optional_parts if getattr(layer, p, None) is not None)

    def part_tensor(self, layer: nn.Module, part: str) -> torch.Tensor:
        """The trained tensor ``part`` of ``layer`` (a parameter, or its submodule's ``weight``)."""
        bare = self.bare_parts or part in self.optional_parts
        return getattr(layer, part) if bare else getattr(layer, part).weight

    def part_key(self, module: str, part: str) -> str:
        """The key of ``part`` of layer ``module`` in PEFT's files (without ``base_model.model.``)."""
        bare = self.bare_parts or part in self.optional_parts
        return f"{module}.{part}" if bare else f"{module}.{part}.weight"


_SPECS: dict[str, AdapterSpec] = {}


def register(spec: AdapterSpec) -> AdapterSpec:
    """Make ``spec``'s adapter known to qft's verbs; returns ``spec``. Names, config types, layer
    types and PEFT types are unique."""
    for other in _SPECS.values():
        clash = [f for f in ("name", "config_type", "layer_type", "peft_type") if getattr(other, f) == getattr(spec, f)]
        if clash:
            raise ValueError(f"adapter {spec.name!r} has the {clash[0]} of adapter {other.name!r}")
    _SPECS[spec.name] = spec
    return spec


def specs() -> tuple[AdapterSpec, ...]:
    """Every registered adapter, by name."""
    return tuple(_SPECS[name] for name in sorted(_SPECS))


def spec_named(name: str) -> AdapterSpec | None:
    """The adapter called ``name`` (``"lora"``), or None."""
    return _SPECS.get(name)


def spec_for_config(config) -> AdapterSpec | None:
    """The adapter whose config ``config`` is, or None."""
    return next((s for s in _SPECS.values() if type(config) is s.config_type), None)


def spec_for_layer(module: nn.Module) -> AdapterSpec | None:
    """The adapter whose layer ``module`` is, or None."""
    return next((s for s in _SPECS.values() if isinstance(module, s.layer_type)), None)


def spec_for_peft_type(peft_type: str) -> AdapterSpec | None:
    """The adapter PEFT calls ``peft_type`` (``"LORA"``), or None."""
    return next((s for s in _SPECS.values() if s.peft_type == peft_type), None)


def quantized_weight(layer: nn.Module) -> QuantizedTensor | None:
    """A quantized base layer's frozen weight (``QuantLinear.quantized``), or None for another layer."""
    qt = getattr(layer, "quantized", None)
    return qt if isinstance(qt, QuantizedTensor) else None


def require_default_init(init: str, kind: str) -> None:
    """The demo's ``--init`` check for adapters with one init: ``ValueError`` for any other."""
    if init != "default":
        raise ValueError(f"--init {init} does not apply to {kind} adapters")


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """What an input-side transform (a rotation, a reflection) computes in: fp32, or fp64 when an
    input is fp64 (float64 gradchecks)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """How a qft-only adapter's ``adapter_config.json`` writes a dtype (``"float32"``)."""
    return str(dtype).removeprefix("torch.")


def dtype_named(raw: dict, key: str = "adapter_dtype") -> torch.dtype:
    """The dtype ``raw[key]`` names (fp32 when absent); ``ValueError`` for a name torch does not have."""
    dtype = getattr(torch, raw.get(key, "float32"), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{key} {raw.get(key)!r} is not a torch dtype")
    return dtype


@torch.no_grad()
def add_to_base_weight(base: nn.Module, delta: torch.Tensor) -> None:
    """``W += delta`` (fp32 [out, in]) for an additive adapter's merge: a quantized base is decoded,
    summed and re-quantized (lossy; ``set_weight`` warns), a plain one updated in its dtype."""
    if quantized_weight(base) is not None:
        base.set_weight(base.dequantize(torch.float32) + delta)
    else:
        base.weight += delta.to(base.weight.dtype)


class AdditiveMerge:
    """``merge`` / ``unmerge`` for an adapter layer whose update adds ``delta_weight()`` (fp32 [out, in])
    to ``base_layer``'s weight (LoRA, DiaBlo); the layer keeps ``merged``."""

    def merge(self) -> None:
        """Fold the adapter into the base weight (a quantized base is re-quantized: lossy, as in PEFT)."""
        if not self.merged:
            add_to_base_weight(self.base_layer, self.delta_weight())
            self.merged = True

    def unmerge(self) -> None:
        """Take the adapter back out of the base weight (a quantized base is re-quantized again)."""
        if self.merged:
            add_to_base_weight(self.base_layer, -self.delta_weight())
            self.merged = False


@torch.no_grad()
def transform_base_weight(base: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``W = transform(W)`` (fp32 [out, in] in and out) for a multiplicative adapter's merge: a quantized
    base is decoded, transformed and re-quantized (lossy; ``set_weight`` warns), a plain one transformed
    in fp32 and stored in its dtype."""
    if quantized_weight(base) is not None:
        base.set_weight(transform(base.dequantize(torch.float32)))
    else:
        base.weight.copy_(transform(base.weight.float()).to(base.weight.dtype))


class TargetedConfig:
    """What every adapter config shares: PEFT's target matching over its ``target_modules``."""

    def matches(self, name: str) -> bool:
        """True when module ``name`` is one of the targets (PEFT's rules: a whole-name regular
        expression for a string, else equal to or ending in ``"." + target``)."""
        return target_matches(self.target_modules, name)


ADAPTER_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_adapter_dtype(dtype) -> None:
    """``TypeError`` unless ``dtype`` is a floating dtype adapters may be kept in."""
    if dtype not in ADAPTER_DTYPES:
        raise TypeError(f"adapter_dtype must be a floating dtype, got {dtype}")


def check_base_layer(layer: nn.Module) -> None:
    """``TypeError`` unless ``layer`` is an ``nn.Linear`` or a quantized linear layer."""
    if not isinstance(layer, nn.Linear) and quantized_weight(layer) is None:
        raise TypeError(f"base_layer must be a QuantLinear or nn.Linear, got {type(layer).__name__}")


def attach_base(layer: nn.Module, base_layer: nn.Module, config, config_type: type) -> None:
    """An adapter layer's first step: check ``base_layer`` (``check_base_layer``) and that ``config`` is a
    ``config_type`` (``TypeError``), then keep both and the base's ``in_features`` / ``out_features``."""
    check_base_layer(base_layer)
    if not isinstance(config, config_type):
        article = "an" if config_type.__name__[0] in "AEHIOU" else "a"
        raise TypeError(f"config must be {article} {config_type.__name__}, got {type(config).__name__}")
    layer.base_layer, layer.config = base_layer, config
    layer.in_features, layer.out_features = base_layer.in_features, base_layer.out_features


def checked_targets(targets) -> str | tuple[str, ...]:
    """PEFT's ``target_modules``: one string (a regular expression) or a non-empty list of names."""
    if isinstance(targets, str):
        compile_pattern(targets, "target_modules")
        return targets
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must name at least one module, got {targets!r}")
    return targets


def target_matches(targets: str | tuple[str, ...], name: str) -> bool:
    """PEFT's rule: a string must match the whole module name; a name must equal it or end it after a dot."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def compile_pattern(pattern, what: str) -> re.Pattern:
    """``re.compile(pattern)``; ``ValueError`` naming ``what`` for an empty or malformed one."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{what} patterns must be non-empty strings, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what}: {pattern!r} is not a regular expression: {exc}") from None


def _discover() -> None:
    for found in pkgutil.iter_modules(__path__, f"{__name__}."):
        if found.ispkg:  # each subpackage registers its spec when imported
            importlib.import_module(found.name)


_discover()
