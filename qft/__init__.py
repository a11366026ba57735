"""qft: GPU kernels for quantized low-rank finetuning.

``quantize``/``dequantize``/``QuantizedTensor`` (nf4/fp4 with double quantization, byte-compatible
with bitsandbytes); ``qft.functional`` (quant_linear, lora_linear, oft_linear); ``qft.adapters``
(one folder per kind of adapter: LoRA, OFT, BOFT, DiaBlo, ETHER, HRA, registered by config type);
``qft.nn`` modules and the model verbs ``quantize_``, ``add_adapters``, ``merge_adapters``,
``save_adapters``, ``load_adapters``; ``qft.ops`` holds the ``qft::`` custom ops.
"""

from qft import adapters, formats, functional, integrations, nn, ops, optim
from qft.nn import (
    BOFTConfig,
    DiaBloConfig,
    ETHERConfig,
    HRAConfig,
    LoRAConfig,
    OFTConfig,
    QuantConfig,
    add_adapters,
    calibrate,
    load_adapters,
    merge_adapters,
    plan_bits,
    quantize_,
    save_adapters,
    unmerge_adapters,
)
from qft.tensor import QuantizedTensor, dequantize, quantize

__version__ = "0.1.0"

integrations.install_transformers_hook()  # registers quant_method "qft" once transformers loads its quantizers


def __getattr__(name: str):
    # QftConfig lives with the transformers integration, imported (with transformers) only when asked
    # for; it stays out of __all__ so `from qft import *` never needs transformers.
    if name == "QftConfig":
        from qft.integrations.transformers import QftConfig

        return QftConfig
    raise AttributeError(f"module 'qft' has no attribute {name!r}")


__all__ = [
    "BOFTConfig",
    "DiaBloConfig",
    "ETHERConfig",
    "HRAConfig",
    "LoRAConfig",
    "OFTConfig",
    "QuantConfig",
    "QuantizedTensor",
    "__version__",
    "adapters",
    "add_adapters",
    "calibrate",
    "dequantize",
    "formats",
    "functional",
    "integrations",
    "load_adapters",
    "merge_adapters",
    "nn",
    "ops",
    "optim",
    "plan_bits",
    "quantize",
    "quantize_",
    "save_adapters",
    "unmerge_adapters",
]
