"""Triton kernels of qft, installed as ``qft.kernels``.

Each module holds the ``@triton.jit`` kernels of one op and a launcher that checks its inputs,
allocates the outputs and picks the grid. Launchers take plain tensors; ``qft.ops`` dispatches to
them. Under ``TRITON_INTERPRET=1`` they also run on CPU tensors (tests).
"""

import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
