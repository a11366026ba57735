"""Saving and loading LoRA adapters in PEFT's on-disk format.

A folder with ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight`` /
``lora_B.weight``) and ``adapter_config.json`` (a PEFT ``LoraConfig``), so
``PeftModel.from_pretrained`` reads what qft saves, and qft reads what PEFT saves.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qft.nn.config import LoRAConfig
from qft.nn.model import add_adapters, lora_layers

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."
# PEFT's in-memory keys carry the adapter name (lora_A.default.weight); saved files drop it.
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_[AB])(?:\.[^.]+)?\.weight$")


def _shared_config(model: nn.Module) -> LoRAConfig:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters (add_adapters first)")
    configs = {layer.config for layer in layers.values()}
    if len(configs) != 1:
        raise ValueError("adapters with different LoRAConfigs cannot be saved as one PEFT adapter")
    return configs.pop()


def save_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's adapters to folder ``path`` in PEFT's format (created if needed)."""
    config = _shared_config(model)
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": list(config.target_modules), "use_rslora": config.use_rslora, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
    }  # fmt: skip
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME))
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(peft_config, f, indent=2)


def _read_config(path) -> LoRAConfig:
    with open(os.path.join(path, CONFIG_NAME)) as f:
        raw = json.load(f)
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path} holds a {raw.get('peft_type')} adapter, not LoRA")
    return LoRAConfig(
        r=raw["r"], alpha=raw.get("lora_alpha", raw["r"]), dropout=raw.get("lora_dropout", 0.0),
        target_modules=tuple(raw["target_modules"]), use_rslora=raw.get("use_rslora", False),
    )  # fmt: skip


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapters saved by ``save_adapters`` or PEFT into ``model``; returns ``model``.

    A model without adapters gets them first, from the folder's ``adapter_config.json``. Every key
    and shape is checked before anything is copied: an adapter for another model raises ValueError
    and leaves the model unchanged.
    """
    if not lora_layers(model):
        add_adapters(model, _read_config(path))
    weights_file = path if os.path.isfile(path) else os.path.join(path, WEIGHTS_NAME)
    loaded = {}
    for key, tensor in load_file(weights_file).items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{weights_file}: {key!r} is not a LoRA weight key")
        loaded[(match["module"], match["part"])] = tensor
    layers = lora_layers(model)
    expected = {(name, part) for name in layers for part in ("lora_A", "lora_B")}
    missing, unexpected = sorted(expected - loaded.keys()), sorted(loaded.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"adapter does not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for (name, part), tensor in loaded.items():
        param = getattr(layers[name], part).weight
        if tensor.shape != param.shape:
            raise ValueError(f"{name}.{part}: adapter has shape {tuple(tensor.shape)}, model {tuple(param.shape)}")
    with torch.no_grad():
        for (name, part), tensor in loaded.items():
            getattr(layers[name], part).weight.copy_(tensor)
    return model
