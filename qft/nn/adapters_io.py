"""Saving and loading LoRA and OFT adapters in PEFT's on-disk format.

A folder with ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight`` /
``lora_B.weight``, or ``<module>.oft_R.weight``) and ``adapter_config.json`` (a PEFT ``LoraConfig``
or ``OFTConfig``), so ``PeftModel.from_pretrained`` reads what qft saves, and qft reads what PEFT
saves.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qft.nn.config import LoRAConfig
from qft.nn.model import build_adapters, install_adapters, lora_layers, oft_layers
from qft.nn.oft import OFTConfig

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."
# PEFT's in-memory keys carry the adapter name (lora_A.default.weight); saved files drop it.
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_[AB]|oft_R)(?:\.[^.]+)?\.weight$")


def _adapter_layers(model: nn.Module) -> tuple[dict, tuple[str, ...]]:
    """(layers by name, their parameter parts): the model's LoRA or OFT adapters (not both)."""
    lora, oft = lora_layers(model), oft_layers(model)
    if lora and oft:
        raise ValueError("the model mixes LoRA and OFT adapters: PEFT saves one kind per adapter")
    return (lora, ("lora_A", "lora_B")) if lora else (oft, ("oft_R",))


def _shared_config(model: nn.Module):
    layers, _ = _adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapters (add_adapters first)")
    configs = {layer.config for layer in layers.values()}
    if len(configs) != 1:
        raise ValueError("adapters with different configs cannot be saved as one PEFT adapter")
    return configs.pop()


def _peft_config(config) -> dict:
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    common = {"task_type": None, "base_model_name_or_path": None, "inference_mode": True, "bias": "none",
              "target_modules": targets, "modules_to_save": None}  # fmt: skip
    if isinstance(config, OFTConfig):
        return {
            "peft_type": "OFT", **common, "r": 0, "oft_block_size": config.block_size, "module_dropout": 0.0,
            "init_weights": True, "coft": config.coft, "eps": config.eps, "block_share": config.block_share,
            "use_cayley_neumann": config.use_cayley_neumann, "num_cayley_neumann_terms": config.cayley_neumann_terms,
            "fan_in_fan_out": False,
        }  # fmt: skip
    return {
        "peft_type": "LORA", **common, "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora, "fan_in_fan_out": False, "init_lora_weights": True,
        "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
    }  # fmt: skip


def save_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's adapters to folder ``path`` in PEFT's format (created if needed)."""
    config = _shared_config(model)
    layers, parts = _adapter_layers(model)
    tensors = {
        f"{_PREFIX}{name}.{part}.weight": getattr(layer, part).weight.detach().cpu().contiguous()
        for name, layer in layers.items()
        for part in parts
    }
    peft_config = _peft_config(config)
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


def _read_config(path) -> LoRAConfig | OFTConfig:
    """The adapter config in folder ``path``; ``ValueError`` naming the file when it is malformed."""
    file = os.path.join(path, CONFIG_NAME)
    try:
        with open(file) as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise ValueError("it must hold a JSON object")
        return _config_from_peft(raw, path)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"{file}: not a usable PEFT adapter config: {what}") from exc


def _config_from_peft(raw: dict, path) -> LoRAConfig | OFTConfig:
    kind = raw.get("peft_type", "LORA")
    if kind == "OFT":
        if not raw.get("oft_block_size"):
            raise ValueError(f"{path}: OFT adapters given by r instead of oft_block_size are not supported")
        return OFTConfig(
            block_size=raw["oft_block_size"], cayley_neumann_terms=raw.get("num_cayley_neumann_terms", 5),
            use_cayley_neumann=raw.get("use_cayley_neumann", True), block_share=raw.get("block_share", False),
            coft=raw.get("coft", False), eps=raw.get("eps", 6e-5), target_modules=raw["target_modules"],
        )  # fmt: skip
    if kind != "LORA":
        raise ValueError(f"{path} holds a {kind} adapter; qft reads LoRA and OFT")
    return LoRAConfig(
        r=raw["r"], alpha=raw.get("lora_alpha", raw["r"]), dropout=raw.get("lora_dropout", 0.0),
        target_modules=raw["target_modules"], use_rslora=raw.get("use_rslora", False),
        rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {},
    )  # fmt: skip


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapters saved by ``save_adapters`` or PEFT into ``model``; returns ``model``.

    A model without adapters gets them from the folder's ``adapter_config.json``. The config and every
    key and shape are read and checked before the model is touched (fresh adapters are built aside and
    installed only once their weights are in): a bad file raises ValueError and leaves the model as it
    was.
    """
    fresh = None
    if not lora_layers(model) and not oft_layers(model):
        config = _read_config(path)
        fresh = build_adapters(model, config)
        layers, parts = fresh, ("oft_R",) if isinstance(config, OFTConfig) else ("lora_A", "lora_B")
    else:
        layers, parts = _adapter_layers(model)
    weights_file = path if os.path.isfile(path) else os.path.join(path, WEIGHTS_NAME)
    loaded = {}
    for key, tensor in load_file(weights_file).items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{weights_file}: {key!r} is not a LoRA weight key")
        loaded[(match["module"], match["part"])] = tensor
    expected = {(name, part) for name in layers for part in parts}
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
    if fresh is not None:
        install_adapters(model, fresh)
    return model
