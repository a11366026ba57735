"""Saving and loading adapters in PEFT's on-disk format.

A folder with ``adapter_model.safetensors`` (keys ``base_model.model.<module>.<part>.weight``, such as
``lora_A`` / ``lora_B`` or ``oft_R``) and ``adapter_config.json`` (a PEFT ``LoraConfig``, ``OFTConfig``,
...), so ``PeftModel.from_pretrained`` reads what qft saves, and qft reads what PEFT saves. Each
adapter's spec (``qft.adapters``) gives its parts, its PEFT type and its config's fields.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qft import adapters
from qft.nn.model import adapter_layers, build_adapters, install_adapters

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."


def _key_pattern() -> re.Pattern:
    parts = "|".join(re.escape(part) for spec in adapters.specs() for part in spec.parts + spec.optional_parts)
    # PEFT's in-memory keys carry the adapter name (lora_A.default.weight); saved files drop it.
    # Parts that are bare parameters (PEFT's hra_u) have no ``.weight``.
    return re.compile(rf"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>{parts})(?:\.[^.]+)?(?:\.weight)?$")


def _adapter_layers(model: nn.Module) -> tuple[dict, adapters.AdapterSpec | None]:
    """(layers by name, their spec): the model's adapters, all of one kind (None: it has none)."""
    layers = adapter_layers(model)
    kinds = {spec.name: spec for spec in map(adapters.spec_for_layer, layers.values())}
    if len(kinds) > 1:
        raise ValueError(f"the model mixes {' and '.join(sorted(kinds))} adapters: PEFT saves one kind per adapter")
    return layers, next(iter(kinds.values()), None)


def _peft_config(config, spec: adapters.AdapterSpec) -> dict:
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    common = {
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "bias": "none",
        "target_modules": targets,
        "modules_to_save": None,
    }
    return {"peft_type": spec.peft_type, **common, **spec.to_peft(config)}


def save_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's adapters to folder ``path`` in PEFT's format (created if needed)."""
    layers, spec = _adapter_layers(model)
    if spec is None:
        raise ValueError("the model has no adapters (add_adapters first)")
    configs = {layer.config for layer in layers.values()}
    if len(configs) != 1:
        raise ValueError("adapters with different configs cannot be saved as one PEFT adapter")
    tensors = {
        _PREFIX + spec.part_key(name, part): spec.part_tensor(layer, part).detach().cpu().contiguous()
        for name, layer in layers.items()
        for part in spec.layer_parts(layer)
    }
    peft_config = _peft_config(configs.pop(), spec)
    os.makedirs(path, exist_ok=True)
    _replace_file(os.path.join(path, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp))
    _replace_file(os.path.join(path, CONFIG_NAME), lambda tmp: _write_json(tmp, peft_config))


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _replace_file(path: str, write) -> None:
    """``write(tmp)`` a file beside ``path``, then rename it over ``path``: a reader never sees half a
    file, a failed write leaves the old one, and a symbolic link at ``path`` is replaced, never
    written through (its target outside the folder stays untouched)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_config(path):
    """The adapter config in folder ``path``; ``ValueError`` naming the file when it is malformed."""
    file = os.path.join(path, CONFIG_NAME)
    try:
        with open(file) as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise ValueError("it must hold a JSON object")
        spec = adapters.spec_for_peft_type(raw["peft_type"])
        if spec is None:
            known = " and ".join(s.peft_type for s in adapters.specs())
            raise ValueError(f"it holds a {raw['peft_type']} adapter; qft reads {known}")
        return spec.from_peft(raw)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"{file}: not a usable PEFT adapter config: {what}") from exc


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapters saved by ``save_adapters`` or PEFT into ``model``; returns ``model``.

    A model without adapters gets them from the folder's ``adapter_config.json``. The config and every
    key and shape are read and checked before the model is touched (fresh adapters are built aside and
    installed only once their weights are in): a bad file raises ValueError and leaves the model as it
    was.
    """
    fresh = None
    layers, spec = _adapter_layers(model)
    if spec is None:
        config = _read_config(path)
        layers = fresh = build_adapters(model, config)
        spec = adapters.spec_for_config(config)
    weights_file = path if os.path.isfile(path) else os.path.join(path, WEIGHTS_NAME)
    key_pattern = _key_pattern()
    loaded = {}
    for key, tensor in load_file(weights_file).items():
        match = key_pattern.match(key)
        if match is None:
            raise ValueError(f"{weights_file}: {key!r} is not an adapter weight key")
        loaded[(match["module"], match["part"])] = tensor
    expected = {(name, part) for name, layer in layers.items() for part in spec.layer_parts(layer)}
    missing, unexpected = sorted(expected - loaded.keys()), sorted(loaded.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"adapter does not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for (name, part), tensor in loaded.items():
        param = spec.part_tensor(layers[name], part)
        if tensor.shape != param.shape:
            raise ValueError(f"{name}.{part}: adapter has shape {tuple(tensor.shape)}, model {tuple(param.shape)}")
    with torch.no_grad():
        for (name, part), tensor in loaded.items():
            spec.part_tensor(layers[name], part).copy_(tensor)
    if fresh is not None:
        install_adapters(model, fresh)
    return model
