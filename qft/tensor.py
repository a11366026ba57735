"""QuantizedTensor: packed 4-bit codes + blockwise scales (+ double-quant state).

``quantize``/``dequantize`` run through the ``qft::`` custom ops, so they use the CUDA extension
or Triton on a GPU and the pure-torch reference on CPU. State dicts hold plain tensors only
(safetensors-ready); ``from_bnb``/``to_bnb`` exchange bitsandbytes' packed bytes and QuantState.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from qft import formats, ops

STATE_VERSION = 1
_METADATA_KEY = "quant_state"


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A frozen weight stored blockwise in a 4-bit code-book format.

    Attributes:
        packed: uint8 ``[(numel + 1) // 2]``, two codes per byte (element 2j in the high nibble).
        absmax: fp32 ``[num_blocks]``, or uint8 ``[num_blocks]`` dynamic-map codes if double-quantized.
        nested_absmax: fp32 ``[ceil(num_blocks / nested_block_size)]`` when double-quantized, else None.
        offset: fp32 scalar (0-dim) mean subtracted before double quantization, else None.
        shape: the original shape; dtype: the original floating dtype (default of ``dequantize``).
        format: a name in ``qft.formats.FORMATS``; block_size: values per scale block (or group).
        zero: fp16 ``[num_blocks]`` zero points of affine formats (int4/int3/int2), else None.

    For 3- and 2-bit formats ``packed`` holds int32 words; for every format but nf4/fp4 ``absmax``
    is the block's (searched or affine) scale.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None
    offset: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    format: str
    block_size: int
    nested_block_size: int = formats.NESTED_BLOCK_SIZE
    zero: torch.Tensor | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def double_quant(self) -> bool:
        """True when absmax is stored as 8-bit codes with a second-level scale and offset."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        """Number of quantized values."""
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        """Device holding the packed codes (all parts live on one device)."""
        return self.packed.device

    def _parts(self) -> list[torch.Tensor]:
        parts = [self.packed, self.absmax]
        if self.double_quant:
            parts += [self.nested_absmax, self.offset]
        if self.zero is not None:
            parts.append(self.zero)
        return parts

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (codes, scales, double-quant state)."""
        return sum(t.numel() * t.element_size() for t in self._parts())

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
        if formats.is_4bit_codebook(self.format):
            flat = ops.dequantize_4bit(
                self.packed, self.absmax, self.nested_absmax, self.offset, self.block_size, self.format,
                self.numel, dtype, self.nested_block_size,
            )  # fmt: skip
        else:
            flat = ops.dequantize_lowbit(
                self.packed, self.absmax, self.nested_absmax, self.offset, self.zero, self.block_size, self.format,
                self.numel, dtype, self.nested_block_size,
            )  # fmt: skip
        return flat.view(self.shape)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """A copy on ``device`` (self if already there); the codes are moved, never re-quantized."""
        device = torch.device(device)
        if self.device == device:
            return self
        move = lambda t: None if t is None else t.to(device)
        return replace(
            self, packed=move(self.packed), absmax=move(self.absmax),
            nested_absmax=move(self.nested_absmax), offset=move(self.offset), zero=move(self.zero),
        )  # fmt: skip

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat dict of plain tensors (safetensors-ready); metadata is a uint8 JSON tensor."""
        meta = {
            "version": STATE_VERSION, "format": self.format, "block_size": self.block_size,
            "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
            "nested_block_size": self.nested_block_size if self.double_quant else None,
        }  # fmt: skip
        state = {"packed": self.packed, "absmax": self.absmax}
        if self.double_quant:
            state["nested_absmax"] = self.nested_absmax
            state["offset"] = self.offset
        if self.zero is not None:
            state["zero"] = self.zero
        state[_METADATA_KEY] = _json_to_tensor(meta)
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> QuantizedTensor:
        """Rebuild from ``state_dict()``; ``ValueError`` naming the key when it does not fit."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of tensors, got {type(state).__name__}")
        for key in ("packed", "absmax", _METADATA_KEY):
            if key not in state:
                raise ValueError(f"state dict is missing {key!r} (has {sorted(state)})")
        meta = _tensor_to_json(state[_METADATA_KEY])
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"state dict version {meta.get('version')!r} is not {STATE_VERSION}")
        nested = meta.get("nested_block_size") is not None
        for key in ("nested_absmax", "offset"):
            if (key in state) != nested:
                raise ValueError(f"state dict {'lacks' if nested else 'has unexpected'} {key!r}")
        dtype = getattr(torch, str(meta["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"state dict names an unknown dtype {meta['dtype']!r}")
        qt = cls(
            packed=state["packed"], absmax=state["absmax"],
            nested_absmax=state.get("nested_absmax"), offset=state.get("offset"),
            shape=torch.Size(meta["shape"]), dtype=dtype, format=meta["format"],
            block_size=meta["block_size"],
            nested_block_size=meta["nested_block_size"] if nested else formats.NESTED_BLOCK_SIZE,
            zero=state.get("zero"),
        )  # fmt: skip
        return check_finite_scales(qt)

    @classmethod
    def empty(cls, shape, dtype: torch.dtype, format: str = "nf4", block_size: int = formats.DEFAULT_BLOCK_SIZE,
              double_quant: bool = True, device: torch.device | str = "meta") -> QuantizedTensor:  # fmt: skip
        """Uninitialized parts of the right sizes (on the meta device by default): a skeleton that a
        checkpoint loader fills, for weights that are never materialized in float."""
        spec = formats.get_format(format)
        formats.check_block_size(block_size, format)
        numel = math.prod(shape)
        blocks = formats.num_blocks(numel, block_size)
        new = lambda n, dt: torch.empty(n, dtype=dt, device=device)
        packed = new(formats.packed_numel(numel, spec.bits), formats.packed_dtype(spec.bits))
        zero = new(blocks, torch.float16) if spec.affine else None
        if not double_quant:
            return cls(packed, new(blocks, torch.float32), None, None, torch.Size(shape), dtype, format, block_size,
                       zero=zero)  # fmt: skip
        nested = new(formats.num_blocks(blocks, formats.NESTED_BLOCK_SIZE), torch.float32)
        offset = torch.empty((), dtype=torch.float32, device=device)
        return cls(packed, new(blocks, torch.uint8), nested, offset, torch.Size(shape), dtype, format, block_size,
                   zero=zero)  # fmt: skip

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> QuantizedTensor:
        """Wrap bitsandbytes' 4-bit ``(packed, QuantState)`` without re-quantizing.

        The bytes, absmax and double-quant state are shared as they are; ``dequantize`` then equals
        ``bitsandbytes.functional.dequantize_4bit`` bit for bit.
        """
        from qft import bnb_interop

        return check_finite_scales(bnb_interop.from_bnb(cls, packed, quant_state))

    def to_bnb(self):
        """``(packed uint8 [n/2, 1], bitsandbytes.functional.QuantState)`` sharing this tensor's data."""
        from qft import bnb_interop

        return bnb_interop.to_bnb(self)

    def __repr__(self) -> str:
        dq = f", double_quant(block={self.nested_block_size})" if self.double_quant else ""
        return (
            f"QuantizedTensor(shape={tuple(self.shape)}, format={self.format!r}, block_size={self.block_size}"
            f"{dq}, dtype={self.dtype}, device={self.device}, bits_per_param={self.bits_per_param:.3f})"
        )


def _check_float_dtype(dtype: torch.dtype, name: str) -> None:
    if dtype not in ops.FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of float32/float16/bfloat16, got {dtype}")


def _validate(qt: QuantizedTensor) -> None:
    formats.get_format(qt.format)
    formats.check_block_size(qt.block_size, qt.format)
    _check_float_dtype(qt.dtype, "dtype")
    if any(int(d) < 0 for d in qt.shape) or math.prod(qt.shape) == 0:
        raise ValueError(f"shape must describe a non-empty tensor, got {tuple(qt.shape)}")
    ops.check_quantized_parts(
        qt.packed, qt.absmax, qt.nested_absmax, qt.offset, qt.numel, qt.block_size, qt.nested_block_size,
        qt.format, qt.zero,
    )  # fmt: skip


def check_finite_scales(qt: QuantizedTensor) -> QuantizedTensor:
    """``qt``, or ``ValueError`` when a stored scale, offset or zero is NaN or Inf (such a weight
    decodes to NaN). For parts that come from outside (checkpoints, other libraries): it reads the
    values, a device synchronization on a GPU."""
    for name in ("absmax", "nested_absmax", "offset", "zero"):
        part = getattr(qt, name)
        if part is not None and part.is_floating_point() and part.device.type != "meta":
            if not bool(torch.isfinite(part).all()):
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
) -> QuantizedTensor:
    """Quantize a floating tensor blockwise.

    Args:
        w: fp32/fp16/bf16, any shape (non-contiguous is fine), non-empty, finite.
        format: ``"nf4"`` (default), ``"fp4"`` (both byte-compatible with bitsandbytes),
            ``"lloyd3"``, ``"lloyd2"`` (code books), ``"int4"``, ``"int3"``, ``"int2"`` (affine).
        block_size: values per scale block: a power of two in 32..4096 for code books (default 64),
            32/64/128 for affine groups.
        double_quant: also quantize the per-block scales to 8 bits (bitsandbytes' ``compress_statistics``).
        method: affine formats only: ``"rtn"``, ``"clip"`` or ``"hqq"`` (default; see ``qft.formats``).

    Returns:
        A ``QuantizedTensor`` on ``w``'s device.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    _check_float_dtype(w.dtype, "w.dtype")
    spec = formats.get_format(format)
    formats.check_block_size(block_size, format)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if method not in ("rtn", "clip", "hqq"):
        raise ValueError(f"method must be 'rtn', 'clip' or 'hqq', got {method!r}")
    if w.numel() == 0:
        raise ValueError(f"w must not be empty, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w must be finite: it holds NaN or Inf")
    zero = None
    if formats.is_4bit_codebook(format):
        packed, absmax = ops.quantize_4bit(w, block_size, format)
    else:
        packed, absmax, zero = _quantize_lowbit(w, spec, block_size, method)
    nested_absmax = offset = None
    if double_quant:
        absmax, nested_absmax, offset = ops.quantize_nested(absmax, formats.NESTED_BLOCK_SIZE)
    return QuantizedTensor(packed, absmax, nested_absmax, offset, w.shape, w.dtype, format, block_size, zero=zero)


def _quantize_lowbit(w, spec, block_size: int, method: str):
    """Codes packed per ``formats``, fp32 scales, fp16 zeros (affine). The scale search runs in
    Triton off the reference backend; the elementwise rest is torch code on every device."""
    from qft import reference, reference_lowbit

    triton_search = ops.backend_for(w.device) != "reference"
    zero = None
    if spec.affine:
        x, valid = reference_lowbit.affine_blocks(w, block_size)
        if triton_search:
            from qft.kernels.quantize_lowbit import search_scales

            scale, zero = search_scales(w, spec.name, block_size, method)
        else:
            scale, zero = reference_lowbit.affine_range(x, valid, spec.max_code, search=method != "rtn")
        codes, scale, zero = reference_lowbit.finish_affine(x, valid, scale, zero, spec.max_code, method, w.numel())
        zero = zero.to(torch.float16)
    else:
        x = reference._blocks(w.reshape(-1).float(), block_size)
        if triton_search:
            from qft.kernels.quantize_lowbit import search_scales

            scale, _ = search_scales(w, spec.name, block_size)
        else:
            scale = reference_lowbit.search_codebook_scale(x, spec.name)
        codes = reference_lowbit.codebook_codes(x, scale, spec.name, w.numel())
    packed = reference.pack_4bit(codes, spec.name) if spec.bits == 4 else reference_lowbit.pack(codes, spec.bits)
    return packed, scale, zero


def dequantize(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode ``qt`` to a dense tensor of its original shape (``qt.dequantize(dtype)``)."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    return qt.dequantize(dtype)
