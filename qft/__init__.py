"""qft: GPU kernels for quantized low-rank finetuning.

Public API so far: ``quantize``/``dequantize`` and ``QuantizedTensor`` (nf4/fp4 with double
quantization, byte-compatible with bitsandbytes); ``qft.ops`` holds the ``qft::`` custom ops.
"""

from qft import formats, ops
from qft.tensor import QuantizedTensor, dequantize, quantize

__version__ = "0.1.0"
__all__ = ["QuantizedTensor", "__version__", "dequantize", "formats", "ops", "quantize"]
