"""QuantLinear: a frozen 4-bit weight as a drop-in replacement for ``nn.Linear``.

For nf4/fp4 its state dict uses bitsandbytes' ``Linear4bit`` keys (``weight``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__<fmt>``, ``bias``), so checkpoints move both ways. Formats that
bitsandbytes lacks use the same layout with ``weight.zero`` (affine) and a
``weight.quant_state.qft__<fmt>`` entry instead. A plain float ``weight`` of the right shape (an
``nn.Linear`` checkpoint) is quantized on load.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import torch
from torch import nn

from qft import formats, functional
from qft.nn import flat_storage
from qft.nn.config import QuantConfig
from qft.tensor import QuantizedTensor, check_finite_scales, quantize

_PARTS = ("packed", "absmax", "nested_absmax", "offset", "zero")
PART_BUFFERS = tuple(f"weight_{part}" for part in _PARTS)  # the buffers holding the weight (unflattened)
_BNB_BLOB = "weight.quant_state.bitsandbytes__"
# A layer's state-dict entries besides its quant-state blob (bitsandbytes' Linear4bit layout).
STATE_ENTRIES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.zero")  # fmt: skip
_QFT_BLOB = "weight.quant_state.qft__"


class QuantLinear(nn.Module):
    """``y = x @ W^T + bias`` with W frozen in a 4-bit format (no gradient reaches W).

    Build with ``QuantLinear.from_linear(linear, QuantConfig(...))`` or from a ``QuantizedTensor``.
    The quantized parts are buffers (``.to()``, ``state_dict`` and FSDP see them); casting the
    module's dtype casts the bias only, never the codes or scales.
    """

    def __init__(
        self, qt: QuantizedTensor, bias: torch.Tensor | None = None, input_perm: torch.Tensor | None = None
    ) -> None:
        """``qt`` holds the weight [out, in]; with ``input_perm`` (an act-order GPTQ import) it holds
        the weight's columns in that order, and inputs are gathered by it before the matmul."""
        super().__init__()
        self._flat_layout = None  # set by to_flat_storage
        if not isinstance(qt, QuantizedTensor) or len(qt.shape) != 2:
            raise ValueError(f"qt must be a QuantizedTensor of a 2-D [out, in] weight, got {qt!r}")
        self.out_features, self.in_features = qt.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self._set_quantized(qt)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(qt.device), requires_grad=False)
        if input_perm is not None:
            perm = torch.as_tensor(input_perm, dtype=torch.int64, device=qt.device)
            if not torch.equal(perm.sort().values, torch.arange(self.in_features, device=qt.device)):
                raise ValueError(f"input_perm must be a permutation of range({self.in_features})")
            input_perm = perm
        self.register_buffer("input_perm", input_perm)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig | None = None) -> QuantLinear:
        """Quantize ``linear``'s weight (on its device) with ``config``; the bias is copied, frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        config = QuantConfig() if config is None else config
        qt = quantize(linear.weight.detach(), config.format, config.block_size, config.double_quant, config.method)
        return cls(qt, None if linear.bias is None else linear.bias.detach().clone())

    def _set_quantized(self, qt: QuantizedTensor) -> None:
        self.format, self.block_size, self.nested_block_size = qt.format, qt.block_size, qt.nested_block_size
        self.weight_dtype = qt.dtype
        if getattr(self, "_flat_layout", None) is not None:
            if type(self.weight_storage.detach()) is not torch.Tensor:  # a DTensor shard under FSDP2
                raise RuntimeError("cannot replace the weight of a sharded layer (merge before sharding)")
            buffer, self._flat_layout = flat_storage.pack({part: getattr(qt, part) for part in _PARTS})
            self.weight_storage = nn.Parameter(buffer, requires_grad=False)
            return
        # Non-persistent: the state dict is written in bitsandbytes' layout by _save_to_state_dict.
        for part in _PARTS:
            self.register_buffer(f"weight_{part}", getattr(qt, part), persistent=False)

    def to_flat_storage(self) -> QuantLinear:
        """Move every part of the weight into one uint8 parameter ``weight_storage`` (frozen), which
        FSDP2's ``fully_shard`` shards and all-gathers like any parameter; returns self. The state dict
        then holds that buffer (sharded under FSDP2) instead of bitsandbytes' keys."""
        if self._flat_layout is None:
            parts = {part: getattr(self, f"weight_{part}") for part in _PARTS}
            buffer, self._flat_layout = flat_storage.pack(parts)
            for part in _PARTS:
                del self._buffers[f"weight_{part}"]
            self.weight_storage = nn.Parameter(buffer, requires_grad=False)
        return self

    @property
    def quantized(self) -> QuantizedTensor:
        """The weight as a ``QuantizedTensor`` over this module's buffers (no copy)."""
        if self._flat_layout is None:
            parts = {part: getattr(self, f"weight_{part}") for part in _PARTS}
        else:  # views into the (unsharded) storage
            parts = dict.fromkeys(_PARTS) | flat_storage.unpack(self.weight_storage, self._flat_layout)
        return QuantizedTensor(
            parts["packed"], parts["absmax"], parts["nested_absmax"], parts["offset"],
            torch.Size((self.out_features, self.in_features)), self.weight_dtype, self.format, self.block_size,
            self.nested_block_size, parts["zero"],
        )  # fmt: skip

    @property
    def double_quant(self) -> bool:
        """True when the scales are double-quantized (readable while sharded, unlike ``quantized``)."""
        if self._flat_layout is not None:
            return any(slot.name == "nested_absmax" for slot in self._flat_layout)
        return self.weight_nested_absmax is not None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the weight this layer was quantized from (bitsandbytes' ``Linear4bit`` has the
        attribute too): what PEFT gives new adapters when ``autocast_adapter_dtype=False``. The layer
        itself computes in its input's dtype."""
        return self.weight_dtype

    @property
    def weight(self) -> torch.Tensor:
        """The packed codes (as bitsandbytes' ``Linear4bit.weight`` is; the flat storage once sharded),
        so tools that look a layer's weight up for its device (PEFT, accelerate) find one; use
        ``dequantize()`` for values."""
        return self.weight_packed if self._flat_layout is None else self.weight_storage

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        # PEFT's generic unload (OFT's merge_and_unload, unload) puts a layer's own weight back on it.
        if value is self.weight:
            return
        raise AttributeError("QuantLinear.weight is its packed codes and cannot be assigned; "
                             "set_weight(float_weight) re-quantizes a new weight")  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in] -> [..., out]`` in x's dtype; see ``qft.functional.quant_linear``."""
        return functional.quant_linear(self.permute_input(x), self.quantized, self.bias)

    def forward_with_lora(self, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                          dropout: float = 0.0) -> torch.Tensor:  # fmt: skip
        """``self(x) + scaling * dropout(x) @ lora_A^T @ lora_B^T`` as one ``qft.functional.lora_linear``
        (``lora_A`` in the original feature order, even over an act-order layer)."""
        if self.input_perm is not None:  # x @ A^T == x[:, perm] @ A[:, perm]^T
            lora_A = lora_A.index_select(1, self.input_perm)
        return functional.lora_linear(
            self.permute_input(x), self.quantized, lora_A, lora_B, scaling, self.bias, dropout
        )

    def permute_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with its features in the stored weight's column order (identity without a perm)."""
        return x if self.input_perm is None else x.index_select(-1, self.input_perm)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[out, in]`` weight in its original column order (default dtype: the original)."""
        weight = self.quantized.dequantize(dtype)
        if self.input_perm is None:
            return weight
        return weight.index_select(1, torch.argsort(self.input_perm))

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.format}, block_size={self.block_size}{dq}"
        )

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Re-quantize from a float ``[out, in]`` weight in the original column order (merging adapters),
        keeping this layer's format, block size, double quantization and dtype tag. Warns: the
        outputs change by the rounding."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight must be {(self.out_features, self.in_features)}, got {tuple(weight.shape)}")
        warnings.warn("setting a quantized weight re-quantizes it; outputs change by the rounding", UserWarning,
                      stacklevel=2)  # fmt: skip
        if self.input_perm is not None:  # stored columns are in input_perm order
            weight = weight.index_select(1, self.input_perm)
        qt = self.quantized
        new = quantize(weight.float(), qt.format, qt.block_size, qt.double_quant)
        self._set_quantized(dataclasses.replace(new, dtype=qt.dtype))

    def load_quantized_state(self, state: dict[str, torch.Tensor], method: str = "hqq") -> None:
        """Take the weight from one layer's entries (keys ``weight``, ``weight.absmax``, ... as in this
        module's state dict, without prefix; a float ``weight`` is quantized like this layer, affine
        formats with ``method``). The parts stay on their device; ``ValueError`` if they do not
        describe this layer's shape."""
        qt = _quantized_from_state(state, "", (self.out_features, self.in_features), self, method)
        self._set_quantized(qt)

    def _apply(self, fn, recurse=True):
        if self._flat_layout is not None:  # one uint8 parameter: dtype casts leave it alone
            return super()._apply(fn, recurse)
        # Module.to(dtype)/half() would cast the fp32 scales; let them follow device moves only.
        before = {part: getattr(self, f"weight_{part}") for part in _PARTS}
        super()._apply(fn, recurse)
        for part, old in before.items():
            new = getattr(self, f"weight_{part}")
            if new is not None and new.dtype != old.dtype:
                setattr(self, f"weight_{part}", old.to(new.device))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._flat_layout is not None:  # weight_storage, as torch saves parameters (DTensor shards under FSDP2)
            return
        qt = self.quantized
        spec = formats.get_format(qt.format)
        detach = (lambda t: t) if keep_vars else (lambda t: t.detach())
        destination[prefix + "weight"] = detach(qt.packed.view(-1, 1))
        destination[prefix + "weight.absmax"] = detach(qt.absmax)
        if spec.affine:
            destination[prefix + "weight.zero"] = detach(qt.zero)
        else:
            destination[prefix + "weight.quant_map"] = formats.code(qt.format, qt.device).clone()
        meta = {
            "quant_type": qt.format, "blocksize": qt.block_size, "dtype": str(qt.dtype).removeprefix("torch."),
            "shape": list(qt.shape),
        }  # fmt: skip
        if qt.double_quant:
            destination[prefix + "weight.nested_absmax"] = detach(qt.nested_absmax)
            destination[prefix + "weight.nested_quant_map"] = formats.dynamic_map(qt.device).clone()
            offset = 0.0 if qt.offset.is_meta else qt.offset.item()  # a skeleton (meta) before loading
            meta.update(nested_blocksize=qt.nested_block_size, nested_dtype="float32", nested_offset=offset)
        blob = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        blob_key = _BNB_BLOB if formats.is_4bit_codebook(qt.format) else _QFT_BLOB
        destination[f"{prefix}{blob_key}{qt.format}"] = blob

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        if self._flat_layout is not None:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          errors)  # fmt: skip
            return
        # The weight's own entries are consumed here (torch passes its own copy of the dict); any other
        # "weight..." key stays for torch to report as unexpected (strict mode).
        keys = [k for k in state_dict if k in {prefix + e for e in STATE_ENTRIES} or k.startswith(
            (prefix + _BNB_BLOB, prefix + _QFT_BLOB))]  # fmt: skip
        if prefix + "weight" in state_dict:
            try:
                qt = _quantized_from_state(state_dict, prefix, (self.out_features, self.in_features), self)
            except (ValueError, TypeError, KeyError) as exc:
                errors.append(f"{prefix}weight: {exc}")
            else:
                # Copies, as nn.Module.load_state_dict copies into its tensors: never the caller's tensors.
                qt = qt.to(self.weight.device)
                owned = {part: getattr(qt, part) for part in _PARTS if getattr(qt, part) is not None}
                self._set_quantized(dataclasses.replace(qt, **{part: t.clone() for part, t in owned.items()}))
            for k in keys:
                state_dict.pop(k)
        elif strict:
            missing_keys.append(prefix + "weight")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)


def _quantized_from_state(state, prefix: str, shape: tuple[int, int], module: QuantLinear,
                          method: str = "hqq") -> QuantizedTensor:  # fmt: skip
    """A QuantizedTensor from bitsandbytes' Linear4bit keys, or by quantizing a float weight."""
    weight = state[prefix + "weight"]
    blobs = [k for k in state if k.startswith((prefix + _BNB_BLOB, prefix + _QFT_BLOB))]
    if weight.is_floating_point() and not blobs:
        if getattr(module, "_transpose_float_weight", False):  # from a Conv1D: stored [in, out]
            weight = weight.t()
        if tuple(weight.shape) != shape:
            raise ValueError(f"a float weight must have shape {shape}, got {tuple(weight.shape)}")
        return quantize(weight, module.format, module.block_size, module.double_quant, method)
    if len(blobs) != 1:
        raise ValueError(f"expected one 'weight.quant_state.<library>__<format>' entry, found {len(blobs)}")
    meta = json.loads(bytes(state[blobs[0]].cpu().tolist()).decode())
    fmt = meta["quant_type"]
    spec = formats.get_format(fmt)
    if tuple(meta["shape"]) != shape:
        raise ValueError(f"checkpoint weight has shape {tuple(meta['shape'])}, this layer is {shape}")
    if not spec.affine and not torch.equal(state[prefix + "weight.quant_map"].float().cpu(), formats.code(fmt)):
        raise ValueError(f"weight.quant_map is not the standard {fmt} code book")
    nested = prefix + "weight.nested_absmax" in state
    if nested and not torch.equal(state[prefix + "weight.nested_quant_map"].float().cpu(), formats.dynamic_map()):
        raise ValueError("weight.nested_quant_map is not the signed 8-bit dynamic map")
    dtype = getattr(torch, str(meta["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {meta['dtype']!r}")
    stored = formats.packed_dtype(spec.bits)
    packed = weight if weight.dtype == stored else weight.contiguous().view(stored)
    device = packed.device
    qt = QuantizedTensor(
        packed=packed.reshape(-1), absmax=state[prefix + "weight.absmax"],
        nested_absmax=state[prefix + "weight.nested_absmax"] if nested else None,
        offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=device) if nested else None,
        shape=torch.Size(shape), dtype=dtype, format=fmt, block_size=int(meta["blocksize"]),
        nested_block_size=int(meta.get("nested_blocksize", formats.NESTED_BLOCK_SIZE)),
        zero=state.get(prefix + "weight.zero"),
    )  # fmt: skip
    return check_finite_scales(qt)
