"""torch.library custom ops (``qft::...``), each defined once with a fake implementation so
``torch.compile`` sees one node, and dispatched by device to the reference, Triton or CUDA code.
"""

from qft.ops.dispatch import BACKENDS, DTYPE_CODES, FLOAT_DTYPES, backend_for, use_backend
from qft.ops.linear import quant_linear, quant_linear_grad_input
from qft.ops.oft import oft_rotate, oft_rotate_backward, oft_rotation, oft_rotation_backward
from qft.ops.quant import (
    check_quantized_parts,
    dequantize_4bit,
    dequantize_lowbit,
    dequantize_nested,
    quantize_4bit,
    quantize_nested,
)

__all__ = [
    "BACKENDS",
    "DTYPE_CODES",
    "FLOAT_DTYPES",
    "backend_for",
    "check_quantized_parts",
    "dequantize_4bit",
    "dequantize_lowbit",
    "dequantize_nested",
    "oft_rotate",
    "oft_rotate_backward",
    "oft_rotation",
    "oft_rotation_backward",
    "quant_linear",
    "quant_linear_grad_input",
    "quantize_4bit",
    "quantize_nested",
    "use_backend",
]
