"""Modules and model-level verbs: QuantLinear (frozen quantized base), the adapter layers (LoRALinear,
OFTLinear, from ``qft.adapters``), quantize_/add_adapters/merge/save/load, and the FSDP helpers."""

from qft.adapters.boft import BOFTConfig, BOFTLinear
from qft.adapters.diablo import DiaBloConfig, DiaBloLinear
from qft.adapters.ether import ETHERConfig, ETHERLinear
from qft.adapters.hra import HRAConfig, HRALinear
from qft.adapters.lora import LoRAConfig, LoRALinear
from qft.adapters.oft import OFTConfig, OFTLinear
from qft.nn.adapters_io import load_adapters, save_adapters
from qft.nn.apiq_sequential import apiq_sequential
from qft.nn.calibrate import Calibration, calibrate
from qft.nn.config import QuantConfig
from qft.nn.fsdp import prepare_fsdp, quantized_bytes, shard_model
from qft.nn.fuse import fuse_projections, unfuse_projections
from qft.nn.model import (
    adapter_layers,
    add_adapters,
    lora_layers,
    merge_adapters,
    oft_layers,
    quantize_,
    unmerge_adapters,
)
from qft.nn.plan import BitsPlan, plan_bits
from qft.nn.quant_linear import QuantLinear

__all__ = [
    "BOFTConfig",
    "BOFTLinear",
    "BitsPlan",
    "Calibration",
    "DiaBloConfig",
    "DiaBloLinear",
    "ETHERConfig",
    "ETHERLinear",
    "HRAConfig",
    "HRALinear",
    "LoRAConfig",
    "LoRALinear",
    "OFTConfig",
    "OFTLinear",
    "QuantConfig",
    "QuantLinear",
    "adapter_layers",
    "add_adapters",
    "apiq_sequential",
    "calibrate",
    "fuse_projections",
    "load_adapters",
    "lora_layers",
    "merge_adapters",
    "oft_layers",
    "plan_bits",
    "prepare_fsdp",
    "quantize_",
    "quantized_bytes",
    "save_adapters",
    "shard_model",
    "unfuse_projections",
    "unmerge_adapters",
]
