"""Other libraries' quantized layouts, in one place: bitsandbytes (bytes, QuantState, ``Linear4bit``
state dicts), HQQ layers and GPTQ checkpoints (landing in qft's affine formats)."""

from qft.interop.gptq import from_gptq, unpack_gptq_columns
from qft.interop.hqq import from_hqq

__all__ = ["from_gptq", "from_hqq", "unpack_gptq_columns"]
