"""torch.library custom ops (``qft::...``), each declared once with a fake implementation so
``torch.compile`` sees one node (``schema``), and run by the backend for the tensors' device
(``backend_reference``, ``backend_triton``, ``backend_cuda``; chosen in ``dispatch``).
"""

from qft.ops.dispatch import BACKENDS, DTYPE_CODES, FLOAT_DTYPES, backend_for, use_backend
from qft.ops.oft import oft_rotate, oft_rotate_backward, oft_rotation, oft_rotation_backward
from qft.ops.schema import dequantize, quant_linear, quant_linear_grad_input, quant_lora_backward, quantize

__all__ = [
    "BACKENDS",
    "DTYPE_CODES",
    "FLOAT_DTYPES",
    "backend_for",
    "dequantize",
    "oft_rotate",
    "oft_rotate_backward",
    "oft_rotation",
    "oft_rotation_backward",
    "quant_linear",
    "quant_linear_grad_input",
    "quant_lora_backward",
    "quantize",
    "use_backend",
]
