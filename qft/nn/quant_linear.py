"""QuantLinear: a frozen quantized weight as a drop-in replacement for ``nn.Linear``.

Its state dict uses bitsandbytes' ``Linear4bit`` layout (``qft.interop.bitsandbytes``), so nf4/fp4
checkpoints move both ways; the other formats use the same layout with their own quant-state entry.
A plain float ``weight`` of the right shape (an ``nn.Linear`` checkpoint) is quantized on load.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from qft import formats, functional
from qft.interop import bitsandbytes as bnb_layout
from qft.nn import flat_storage
from qft.nn.config import QuantConfig
from qft.tensor import QuantizedTensor, quantize

PART_BUFFERS = tuple(f"weight_{part}" for part in formats.PART_NAMES)  # the buffers holding the weight (unflattened)


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
    def from_linear(
        cls, linear: nn.Linear, config: QuantConfig | None = None, hessian: torch.Tensor | None = None
    ) -> QuantLinear:
        """Quantize ``linear``'s weight (on its device) with ``config``; the bias is copied, frozen.
        ``hessian``: the layer's calibration statistics (``qft.nn.calibrate``), for method ``"gptq"``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        config = QuantConfig() if config is None else config
        c = config
        qt = quantize(linear.weight.detach(), c.format, c.block_size, c.double_quant, c.method, hessian, c.act_order)
        return cls(qt, None if linear.bias is None else linear.bias.detach().clone())

    def _set_quantized(self, qt: QuantizedTensor) -> None:
        self.__dict__.pop("_quantized_cache", None)
        self.format, self.block_size, self.nested_block_size = qt.format, qt.block_size, qt.nested_block_size
        self.weight_dtype = qt.dtype
        if getattr(self, "_flat_layout", None) is not None:
            if type(self.weight_storage.detach()) is not torch.Tensor:  # a DTensor shard under FSDP2
                raise RuntimeError("cannot replace the weight of a sharded layer (merge before sharding)")
            buffer, self._flat_layout = flat_storage.pack(qt.parts)
            self.weight_storage = nn.Parameter(buffer, requires_grad=False)
            return
        # Non-persistent: the state dict is written in bitsandbytes' layout by _save_to_state_dict.
        for part in formats.PART_NAMES:
            self.register_buffer(f"weight_{part}", qt.parts.get(part), persistent=False)

    def _buffered_parts(self) -> dict[str, torch.Tensor]:
        parts = {part: getattr(self, f"weight_{part}") for part in formats.PART_NAMES}
        return {part: t for part, t in parts.items() if t is not None}

    def to_flat_storage(self) -> QuantLinear:
        """Move every part of the weight into one uint8 parameter ``weight_storage`` (frozen), which
        FSDP2's ``fully_shard`` shards and all-gathers like any parameter; returns self. The state dict
        then holds that buffer (sharded under FSDP2) instead of bitsandbytes' keys."""
        if self._flat_layout is None:
            buffer, self._flat_layout = flat_storage.pack(self._buffered_parts())
            for part in formats.PART_NAMES:
                del self._buffers[f"weight_{part}"]
            self.weight_storage = nn.Parameter(buffer, requires_grad=False)
        return self

    @property
    def quantized(self) -> QuantizedTensor:
        """The weight as a ``QuantizedTensor`` over this module's buffers (no copy). The last one is kept
        while its buffers are the module's own (checking a weight costs as much as a small layer's
        forward on CPU); moves (``_apply``) and new weights drop it."""
        if self._flat_layout is None:
            parts = self._buffered_parts()
        else:  # views into the (unsharded) storage
            parts = flat_storage.unpack(self.weight_storage, self._flat_layout)
        shape = torch.Size((self.out_features, self.in_features))
        meta = (shape, self.weight_dtype, self.format, self.block_size, self.nested_block_size)
        cacheable = self._flat_layout is None and not torch.compiler.is_compiling()
        cached = self.__dict__.get("_quantized_cache") if cacheable else None
        if cached is not None and cached[0] == meta and _same_tensors(cached[1].parts, parts):
            return cached[1]
        qt = QuantizedTensor(parts, *meta)
        if cacheable:
            self.__dict__["_quantized_cache"] = (meta, qt)
        return qt

    @property
    def double_quant(self) -> bool:
        """True when the scales are double-quantized (readable while sharded, unlike ``quantized``)."""
        if self._flat_layout is not None:
            return any(slot.name == "nested_scales" for slot in self._flat_layout)
        return self.weight_nested_scales is not None

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
        return self.weight_codes if self._flat_layout is None else self.weight_storage

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        # PEFT's generic unload (OFT's merge_and_unload, unload) puts a layer's own weight back on it.
        if value is self.weight:
            return
        raise AttributeError(
            "QuantLinear.weight is its packed codes and cannot be assigned; "
            "set_weight(float_weight) re-quantizes a new weight"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in] -> [..., out]`` in x's dtype; see ``qft.functional.quant_linear``."""
        return functional.quant_linear(self.permute_input(x), self.quantized, self.bias)

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
        warnings.warn("setting a quantized weight re-quantizes it; outputs change by the rounding", stacklevel=2)
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
        self.__dict__.pop("_quantized_cache", None)  # moved buffers are new tensors: keep no old ones alive
        if self._flat_layout is not None:  # one uint8 parameter: dtype casts leave it alone
            return super()._apply(fn, recurse)
        # Module.to(dtype)/half() would cast the fp32 scales; let them follow device moves only.
        before = {part: getattr(self, f"weight_{part}") for part in formats.PART_NAMES}
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
        for key, value in bnb_layout.linear4bit_state(self.quantized, keep_vars).items():
            destination[prefix + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        args = (state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        if self._flat_layout is not None:
            super()._load_from_state_dict(*args)
            return
        # The weight's own entries are consumed here (torch passes its own copy of the dict); any other
        # "weight..." key stays for torch to report as unexpected (strict mode).
        keys = [k for k in state_dict if k.startswith(prefix) and bnb_layout.is_linear4bit_key(k[len(prefix) :])]
        if prefix + "weight" in state_dict:
            try:
                qt = _quantized_from_state(state_dict, prefix, (self.out_features, self.in_features), self)
            except (ValueError, TypeError, KeyError) as exc:
                errors.append(f"{prefix}weight: {exc}")
            else:
                # Copies, as nn.Module.load_state_dict copies into its tensors: never the caller's tensors.
                self._set_quantized(qt.to(self.weight.device).map_parts(torch.Tensor.clone))
            for k in keys:
                state_dict.pop(k)
        elif strict:
            missing_keys.append(prefix + "weight")
        super()._load_from_state_dict(*args)


def _quantized_from_state(
    state, prefix: str, shape: tuple[int, int], module: QuantLinear, method: str = "hqq"
) -> QuantizedTensor:
    """A QuantizedTensor from bitsandbytes' Linear4bit keys, or by quantizing a float weight."""
    weight = state[prefix + "weight"]
    if weight.is_floating_point() and not bnb_layout.quant_state_blobs(state, prefix):
        if getattr(module, "_transpose_float_weight", False):  # from a Conv1D: stored [in, out]
            weight = weight.t()
        if tuple(weight.shape) != shape:
            raise ValueError(f"a float weight must have shape {shape}, got {tuple(weight.shape)}")
        return quantize(weight, module.format, module.block_size, module.double_quant, method)
    return bnb_layout.from_linear4bit_state(state, prefix, shape)


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two part dicts hold the very same tensor objects under the same names."""
    return a.keys() == b.keys() and all(a[name] is t for name, t in b.items())
