"""Autograd over the ``qft::`` linear ops: ``quant_linear`` (the bare quantized layer), and the checks
and autocast rules every adapter's function shares (``qft.adapters.<name>.function``).

``lora_linear``, ``oft_linear`` and ``oft_rotation`` live with their adapters and are read through
here too (``qft.functional.lora_linear``), found on first use so this module stays below the adapters.
``quant_linear`` keeps for backward only the packed weight: never a dequantized weight (backward
decodes it again) nor a copy of x.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import torch

from qft import ops
from qft.tensor import QuantizedTensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` gives ``F.linear`` on x's device right now, or None when off."""
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(dtype: torch.dtype, *tensors):
    return [t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors]


def _without_autocast(backward):
    """Run a backward with autocast off: it computes in the dtypes its forward chose, also when
    ``.backward()`` is called inside an autocast region."""

    @functools.wraps(backward)
    def run(ctx, grad):
        device_type = grad.device.type
        off = torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else contextlib.nullcontext()
        with off:
            return backward(ctx, grad)

    return run


class _QuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, bias, qt):
        ctx.qt = qt
        ctx.bias_dtype = None if bias is None else bias.dtype
        return ops.quant_linear(x2d, *qt.op_args(), bias, None, None, 0.0)

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        qt = ctx.qt
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.quant_linear_grad_input(grad, *qt.op_args(), None, None, None, 1.0)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None


def _check_x(x, qt: QuantizedTensor) -> None:
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    if len(qt.shape) != 2:
        raise ValueError(f"qt must hold a 2-D [out, in] weight, got shape {tuple(qt.shape)}")
    if not isinstance(x, torch.Tensor) or x.dtype not in (*_FLOATS, torch.float64):
        raise TypeError(f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] != qt.shape[1]:
        raise ValueError(f"x's last dimension must be in_features={qt.shape[1]}, got shape {tuple(x.shape)}")
    if x.device != qt.device:
        raise ValueError(f"x is on {x.device} but the quantized weight is on {qt.device}")


def _check_bias(bias, qt: QuantizedTensor) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or bias.shape != (qt.shape[0],):
        raise ValueError(f"bias must be a tensor of shape ({qt.shape[0]},), got {getattr(bias, 'shape', bias)}")
    if bias.device != qt.device:
        raise ValueError(f"bias is on {bias.device} but the quantized weight is on {qt.device}")


def quant_linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` with W stored quantized in ``qt`` ([out, in]).

    Args:
        x: ``[..., in]`` fp32/fp16/bf16 (any leading shape); the output follows its dtype.
        qt: the frozen quantized weight, on x's device.
        bias: optional ``[out]``; gets a gradient if it requires one.

    Returns ``[..., out]``. Saved for backward: nothing but ``qt`` (W is decoded again for grad_x).
    Under ``torch.autocast`` it computes as ``nn.Linear`` does: x and bias in the autocast dtype.
    """
    _check_x(x, qt)
    _check_bias(bias, qt)
    dtype = _autocast_dtype(x)
    if dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            x, bias = _cast(dtype, x, bias)
            return quant_linear(x, qt, bias)
    lead = x.shape[:-1]
    y = _QuantLinear.apply(x.reshape(-1, x.shape[-1]), bias, qt)
    return y.view(*lead, qt.shape[0])


# Public names that live with their adapters, by the module holding them: resolved on first access
# (PEP 562), since the adapters import the helpers above.
_ADAPTER_FUNCTIONS = {
    "lora_linear": "qft.adapters.lora.function",
    "oft_linear": "qft.adapters.oft.function",
    "oft_rotation": "qft.adapters.oft.function",
}


def __getattr__(name: str):
    if name in _ADAPTER_FUNCTIONS:
        return getattr(importlib.import_module(_ADAPTER_FUNCTIONS[name]), name)
    raise AttributeError(f"module 'qft.functional' has no attribute {name!r}")
