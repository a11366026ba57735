"""Modules: QuantLinear (frozen 4-bit base), LoRALinear (adapters), and the model-level verbs."""

from qft.nn.adapters_io import load_adapters, save_adapters
from qft.nn.config import LoRAConfig, QuantConfig
from qft.nn.fsdp import prepare_fsdp, quantized_bytes, shard_model
from qft.nn.lora import LoRALinear
from qft.nn.model import add_adapters, lora_layers, merge_adapters, oft_layers, quantize_, unmerge_adapters
from qft.nn.oft import OFTConfig, OFTLinear
from qft.nn.quant_linear import QuantLinear

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "OFTConfig",
    "OFTLinear",
    "QuantConfig",
    "QuantLinear",
    "add_adapters",
    "load_adapters",
    "lora_layers",
    "merge_adapters",
    "oft_layers",
    "prepare_fsdp",
    "quantize_",
    "quantized_bytes",
    "save_adapters",
    "shard_model",
    "unmerge_adapters",
]
