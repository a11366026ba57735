"""What qft runs on: versions, the extensions' state, the GPU, and each op's implementation."""

from __future__ import annotations

import platform

import torch

from qft import ops
from qft._extension import cpu_extension, extension

OP_NAMES = (
    "quantize",
    "dequantize",
    "quant_linear",
    "quant_linear_grad_input",
    "oft_rotate",
    "oft_rotate_backward",
    "oft_rotation",
    "oft_rotation_backward",
)
# The ops the CPU backend runs with qft._cpu; the others run the reference's torch code there.
CPU_KERNEL_OPS = ("dequantize", "quant_linear", "quant_linear_grad_input")


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def _cuda_version(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}" if version else "none"


def collect() -> dict[str, object]:
    """A dict describing this installation; safe to call on a machine with no GPU."""
    ext = extension()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": _triton_version(),
        "extension qft._C": "loaded" if ext.module else f"not loaded ({ext.error})",
    }
    if ext.module is not None:
        info["extension CUDA runtime"] = _cuda_version(ext.module.runtime_version())
        info["CUDA driver"] = _cuda_version(ext.module.driver_version())
        info["extension sees"] = f"{ext.device_count} GPU(s)" if ext.device_count else f"no GPU ({ext.device_status})"
    cpu = cpu_extension()
    if cpu.module is not None:
        info["extension qft._cpu"] = f"loaded ({cpu.module.isa()}, {cpu.module.num_threads()} threads: {cpu.threads})"
    else:
        info["extension qft._cpu"] = f"not loaded ({cpu.error})"
    if torch.cuda.is_available():
        info["GPU"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        info["GPU"] = "none"
    for op in OP_NAMES:
        for device in devices:
            backend = ops.backend_for(device)
            info[f"op {op} on {device}"] = "reference" if backend == "cpu" and op not in CPU_KERNEL_OPS else backend
    return info


def report() -> str:
    """``collect()`` as aligned ``key: value`` lines."""
    info = collect()
    width = max(map(len, info))
    return "\n".join(f"{key:<{width}}  {value}" for key, value in info.items())
