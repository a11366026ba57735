"""QuantizedTensor: a frozen weight's stored parts (declared by its format) plus shape and dtype.

``quantize``/``dequantize`` run through the ``qft::`` custom ops, so they use the CUDA extension or
Triton on a GPU and the reference on CPU. They call the ops by name (``torch.ops.qft``): this module
sits below ``qft.ops`` (which takes its ``Weight``), and ``import qft`` registers the ops. Everything
that lists parts (moves, byte counts, state dicts, the skeleton of an unloaded checkpoint) derives
them from ``qft.formats.layout``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from qft import formats
from qft.formats.gptq import gptq_quantize
from qft.formats.parts import NAMES, STATE_KEYS

STATE_VERSION = 1
_METADATA_KEY = "quant_state"
_FROM_STATE_KEY = {key: name for name, key in STATE_KEYS.items()}


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A frozen weight stored blockwise in one of ``qft.formats.FORMATS``.

    Attributes:
        parts: the stored tensors by name (``qft.formats.parts``): ``codes`` (packed), ``scales`` (fp32
            per block, or uint8 codes when double-quantized), ``zeros`` (fp16, affine formats),
            ``nested_scales`` and ``offset`` (double quantization).
        shape: the original shape; dtype: the original floating dtype (default of ``dequantize``).
        format: a name in ``qft.formats.FORMATS``; block_size: values per scale block (or group).
        nested_block_size: scales per nested scale under double quantization.
    """

    parts: dict[str, torch.Tensor]
    shape: torch.Size
    dtype: torch.dtype
    format: str
    block_size: int
    nested_block_size: int = formats.NESTED_BLOCK_SIZE

    def __post_init__(self) -> None:
        if not isinstance(self.parts, dict):
            raise TypeError(f"parts must be a dict of tensors, got {type(self.parts).__name__}")
        object.__setattr__(self, "shape", torch.Size(self.shape))
        _check_float_dtype(self.dtype, "dtype")
        if any(int(d) < 0 for d in self.shape) or math.prod(self.shape) == 0:
            raise ValueError(f"shape must describe a non-empty tensor, got {tuple(self.shape)}")
        formats.check_weight(self.weight)

    @property
    def weight(self) -> formats.Weight:
        """The parts as the ops and kernels take them (flat: no shape, no dtype tag)."""
        return formats.Weight(self.parts, self.format, self.numel, self.block_size, self.nested_block_size)

    def op_args(self) -> tuple[list[torch.Tensor | None], str, list[int]]:
        """``(parts, fmt, meta)``: the weight as the ``qft::`` ops take it."""
        return self.weight.op_args()

    @property
    def codes(self) -> torch.Tensor:
        """The packed codes (``qft.formats.packing``)."""
        return self.parts["codes"]

    @property
    def scales(self) -> torch.Tensor:
        """Per-block scales: fp32, or uint8 dynamic-map codes when double-quantized."""
        return self.parts["scales"]

    @property
    def zeros(self) -> torch.Tensor | None:
        """fp16 zero points per group (affine formats), else None."""
        return self.parts.get("zeros")

    @property
    def nested_scales(self) -> torch.Tensor | None:
        """fp32 scale per nested block of scales (double quantization), else None."""
        return self.parts.get("nested_scales")

    @property
    def offset(self) -> torch.Tensor | None:
        """fp32 0-dim mean subtracted before double quantization, else None."""
        return self.parts.get("offset")

    # bitsandbytes' names for the parts, as QuantState and earlier qft versions call them.
    packed, absmax, zero, nested_absmax = codes, scales, zeros, nested_scales

    @property
    def double_quant(self) -> bool:
        """True when the scales are stored as 8-bit codes with a second-level scale and offset."""
        return "nested_scales" in self.parts

    @property
    def numel(self) -> int:
        """Number of quantized values."""
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        """Device holding the parts (all live on one device)."""
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes of every stored part (codes, scales, zeros, double-quant state)."""
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    @property
    def bits_per_param(self) -> float:
        """Stored bits per quantized value, scales and double-quant state included.

        The format's fixed code books are not counted: they are constants of the format, not of the
        tensor. NF4 at block 64 with double quantization gives 4.127 for a large tensor.
        """
        return 8 * self.nbytes / self.numel

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Decode to a dense tensor of the original shape in ``dtype`` (default: original dtype)."""
        dtype = self.dtype if dtype is None else dtype
        _check_float_dtype(dtype, "dtype")
        return torch.ops.qft.dequantize(*self.op_args(), dtype).view(self.shape)

    def map_parts(self, fn) -> QuantizedTensor:
        """A copy with ``fn`` applied to every part (moves, clones); metadata unchanged."""
        return replace(self, parts={name: fn(t) for name, t in self.parts.items()})

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """A copy on ``device`` (self if already there); the codes are moved, never re-quantized."""
        device = torch.device(device)
        return self if self.device == device else self.map_parts(lambda t: t.to(device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat dict of plain tensors (safetensors-ready); metadata is a uint8 JSON tensor."""
        meta = {
            "version": STATE_VERSION,
            "format": self.format,
            "block_size": self.block_size,
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "nested_block_size": self.nested_block_size if self.double_quant else None,
        }
        state = {STATE_KEYS[name]: self.parts[name] for name in NAMES if name in self.parts}
        state[_METADATA_KEY] = _json_to_tensor(meta)
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> QuantizedTensor:
        """Rebuild from ``state_dict()``; ``ValueError`` naming the key when it does not fit."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of tensors, got {type(state).__name__}")
        if _METADATA_KEY not in state:
            raise ValueError(f"state dict is missing {_METADATA_KEY!r} (has {sorted(state)})")
        meta = _tensor_to_json(state[_METADATA_KEY])
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"state dict version {meta.get('version')!r} is not {STATE_VERSION}")
        nested = meta.get("nested_block_size") is not None
        formats.get_format(meta.get("format"))  # an unknown format is named before any part
        wanted = formats.stored_names(meta.get("format"), nested)
        for name in wanted:
            if STATE_KEYS[name] not in state:
                raise ValueError(f"state dict is missing {STATE_KEYS[name]!r} (has {sorted(state)})")
        extra = {k for k in state if k in _FROM_STATE_KEY} - {STATE_KEYS[name] for name in wanted}
        if extra:
            raise ValueError(f"state dict has unexpected {sorted(extra)} for this format and double quantization")
        parts = {name: state[STATE_KEYS[name]] for name in wanted}
        qt = cls(
            parts,
            torch.Size(meta["shape"]),
            _dtype_named(meta["dtype"]),
            meta["format"],
            meta["block_size"],
            meta["nested_block_size"] if nested else formats.NESTED_BLOCK_SIZE,
        )
        return check_finite_scales(qt)

    @classmethod
    def empty(
        cls,
        shape,
        dtype: torch.dtype,
        format: str = "nf4",
        block_size: int = formats.DEFAULT_BLOCK_SIZE,
        double_quant: bool = True,
        device: torch.device | str = "meta",
    ) -> QuantizedTensor:
        """Uninitialized parts of the right sizes (on the meta device by default): a skeleton that a
        checkpoint loader fills, for weights that are never materialized in float."""
        formats.check_block_size(block_size, format)
        specs = formats.layout(
            formats.get_format(format), math.prod(shape), block_size, double_quant, formats.NESTED_BLOCK_SIZE
        )
        parts = {s.name: torch.empty((s.numel,) if s.dims else (), dtype=s.dtype, device=device) for s in specs}
        return cls(parts, torch.Size(shape), dtype, format, block_size)

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> QuantizedTensor:
        """Wrap bitsandbytes' 4-bit ``(packed, QuantState)`` without re-quantizing.

        The bytes, absmax and double-quant state are shared as they are; ``dequantize`` then equals
        ``bitsandbytes.functional.dequantize_4bit`` bit for bit.
        """
        from qft.interop import bitsandbytes

        return check_finite_scales(bitsandbytes.from_bnb(cls, packed, quant_state))

    def to_bnb(self):
        """``(packed uint8 [n/2, 1], bitsandbytes.functional.QuantState)`` sharing this tensor's data."""
        from qft.interop import bitsandbytes

        return bitsandbytes.to_bnb(self)

    def __repr__(self) -> str:
        dq = f", double_quant(block={self.nested_block_size})" if self.double_quant else ""
        return (
            f"QuantizedTensor(shape={tuple(self.shape)}, format={self.format!r}, block_size={self.block_size}"
            f"{dq}, dtype={self.dtype}, device={self.device}, bits_per_param={self.bits_per_param:.3f})"
        )


def _check_float_dtype(dtype: torch.dtype, name: str) -> None:
    if dtype not in formats.FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of float32/float16/bfloat16, got {dtype}")


def _dtype_named(name) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"state dict names an unknown dtype {name!r}")
    return dtype


def check_finite_scales(qt: QuantizedTensor) -> QuantizedTensor:
    """``qt``, or ``ValueError`` when a stored scale, offset or zero is NaN or Inf (such a weight
    decodes to NaN). For parts that come from outside (checkpoints, other libraries): it reads the
    values, a device synchronization on a GPU."""
    for name, part in qt.parts.items():
        if part.is_floating_point() and part.device.type != "meta" and not bool(torch.isfinite(part).all()):
            raise ValueError(f"{name} holds NaN or Inf: the stored weight cannot be decoded")
    return qt


def _json_to_tensor(obj: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj, sort_keys=True).encode()), dtype=torch.uint8)


def _tensor_to_json(t: torch.Tensor) -> dict:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
        raise ValueError(f"state dict {_METADATA_KEY!r} must be a uint8 tensor of JSON bytes")
    try:
        obj = json.loads(bytes(t.cpu().tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"state dict {_METADATA_KEY!r} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"state dict {_METADATA_KEY!r} must hold a JSON object")
    return obj


def quantize(
    w: torch.Tensor,
    format: str = "nf4",
    block_size: int = formats.DEFAULT_BLOCK_SIZE,
    double_quant: bool = True,
    method: str = "hqq",
    hessian: torch.Tensor | None = None,
    act_order: bool = False,
) -> QuantizedTensor:
    """Quantize a floating tensor blockwise.

    Args:
        w: fp32/fp16/bf16, any shape (non-contiguous is fine), non-empty, finite.
        format: ``"nf4"`` (default), ``"fp4"`` (both byte-compatible with bitsandbytes), ``"lloyd3"``,
            ``"lloyd2"``, ``"nf3"``, ``"nf2"`` (3-/2-bit code books), ``"int4"``, ``"int3"``, ``"int2"``
            (affine), ``"nf4_icq"``, ``"lloyd3_icq"``, ``"lloyd2_icq"`` (code books with ICQ's offsets).
        block_size: values per scale block: a power of two in 32..4096 for code books (default 64),
            32/64/128 for affine groups.
        double_quant: also quantize the per-block scales to 8 bits (bitsandbytes' ``compress_statistics``).
        method: affine ranges ``"rtn"``, ``"clip"`` or ``"hqq"`` (default; see ``qft.formats.affine``;
            code books search their own), ``"icq"`` (IR-QLoRA's entropy-maximising ranges; a code book
            is stored as its ``_icq`` variant, ``qt.format`` says so; ``qft.formats.icq``), or ``"gptq"``:
            those scales, then codes chosen with GPTQ's error feedback under ``hessian``
            (``qft.formats.gptq``; w 2-D [N, K], block_size dividing K).
        hessian: ``X^T X / n`` [K, K] of the layer's calibration inputs (``qft.nn.calibrate``); gptq only.
        act_order: gptq: round columns in descending order of the hessian's diagonal.

    Returns:
        A ``QuantizedTensor`` on ``w``'s device.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    _check_float_dtype(w.dtype, "w.dtype")
    formats.get_format(format)
    formats.check_block_size(block_size, format)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if method not in (*formats.affine.METHODS, "gptq"):
        raise ValueError(f"method must be 'rtn', 'clip', 'hqq', 'icq' or 'gptq', got {method!r}")
    if method == "icq":
        format = formats.icq_format(format)
    if (method == "gptq") != (hessian is not None):
        raise ValueError("method 'gptq' needs a hessian, and only gptq takes one")
    if w.numel() == 0:
        raise ValueError(f"w must not be empty, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w must be finite: it holds NaN or Inf")
    if method == "gptq":
        weight = gptq_quantize(w, hessian, format, block_size, nested=double_quant, act_order=act_order)
        return QuantizedTensor(weight.parts, w.shape, w.dtype, format, block_size)
    present = torch.ops.qft.quantize(w, format, block_size, method, double_quant)
    names = formats.stored_names(format, double_quant)
    return QuantizedTensor(dict(zip(names, present, strict=True)), w.shape, w.dtype, format, block_size)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode ``qt`` to a dense tensor of its original shape (``qt.dequantize(dtype)``)."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    return qt.dequantize(dtype)
