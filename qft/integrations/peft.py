"""qft's fused layers inside PEFT models.

``register(lora_config)`` makes ``get_peft_model(model, lora_config)`` wrap every targeted
``qft.nn.QuantLinear`` in ``QftLoraLinear`` (PEFT's custom-module hook): PEFT's LoRA layer, state
dict and adapter files, with the forward and backward of ``qft.adapters.lora.lora_linear``.

PEFT has no public hook for OFT, so ``enable_oft()`` is an explicit opt-in: it replaces PEFT's
private ``peft.tuners.oft.model._get_tuner_layer_class`` with a wrapper that returns ``QftOFTLinear``
for ``QuantLinear`` bases (PEFT's OFT layer, forward through ``qft.adapters.oft.oft_linear``) and
defers to PEFT for every other layer. ``disable_oft()`` restores PEFT's function.

These bridges are per PEFT tuner (PEFT hooks each differently) and need PEFT and QuantLinear, so they
live here, above ``qft.nn``, not in the adapters' folders (which import neither). An adapter needs no
bridge to work in qft (``add_adapters``, PEFT's files); a bridge is an optional extra.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.oft import layer as oft_layer
from peft.tuners.oft import model as oft_model
from peft.tuners.tuners_utils import check_adapters_to_merge
from peft.utils.quantization_utils import QuantizationBackend
from torch import nn

from qft.adapters.lora import lora_over
from qft.adapters.oft import oft_linear
from qft.nn.quant_linear import QuantLinear


@contextlib.contextmanager
def _known_layer():
    """PEFT warns "Unsupported layer type" for any layer it does not list, then reads the
    ``in_features`` / ``out_features`` that QuantLinear has: here the warning says nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
        yield


class QftBackend(QuantizationBackend):
    """Merging into a QuantLinear: dequantize to fp32, change, re-quantize in the same format (lossy)."""

    supports_merge = True
    backend_name = "qft"
    layer_type = "linear"

    def get_base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """The fp32 weight in its original column order."""
        return base_layer.dequantize(torch.float32)

    def set_base_weight(self, peft_layer, weight_data: torch.Tensor) -> None:
        """Re-quantize ``weight_data`` into the base layer (``QuantLinear.set_weight`` warns)."""
        peft_layer.get_base_layer().set_weight(weight_data)


class QftLoraLinear(nn.Module, LoraLayer):
    """PEFT's LoRA layer over a QuantLinear: one active adapter (the training case) runs through qft's
    fused ``lora_linear``; several adapters, mixed batches or a merged layer take PEFT's generic path."""

    def __init__(
        self, base_layer, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1, **kwargs
    ) -> None:
        if config.lora_bias:
            raise ValueError("QftLoraLinear does not support lora_bias")
        super().__init__()
        with _known_layer():
            LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self.quantization_backend = QftBackend()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        """Plain LoRA only: variants (DoRA, ...) change the math qft fuses."""
        variants = [
            name for name in ("use_dora", "use_bdlora", "velora_config", "kasa_config") if getattr(config, name, None)
        ]
        if variants:
            raise ValueError(f"qft's LoRA layer supports plain LoRA only, not {variants}")
        return None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B @ A`` in fp32."""
        return self.scaling[adapter] * (self.lora_B[adapter].weight.float() @ self.lora_A[adapter].weight.float())

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters into the base weight (re-quantized). The layer is marked merged only once
        the new weight is in: a refused merge (non-finite with ``safe_merge``, or any failure to
        re-quantize) leaves it unmerged and unchanged."""
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.lora_A]
        if not adapter_names:
            return
        weight = self.get_base_weight()
        for name in adapter_names:
            weight = weight + self.get_delta_weight(name)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs in the merged weight of adapters {adapter_names}")
        self.set_base_weight(weight)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Take the merged adapters back out (re-quantized again); nothing changes if that fails."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_weight()
        for name in self.merged_adapters:
            if name in self.lora_A:
                weight = weight - self.get_delta_weight(name)
        self.set_base_weight(weight)
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """PEFT's LoRA forward; one active adapter on an unmerged layer takes qft's fused path."""
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return base(x)
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) == 1:
            name = active[0]
            dropout = self.lora_dropout[name]
            p = dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0
            return lora_over(base, x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p)
        result = base(x)
        for name in active:
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            update = lora_b(lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype)))) * self.scaling[name]
            result = result + update.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register(config: LoraConfig) -> LoraConfig:
    """Make ``get_peft_model(model, config)`` build ``QftLoraLinear`` for QuantLinear targets; returns
    ``config``. Adapters save and load with PEFT's own files and keys."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QuantLinear: QftLoraLinear})
    return config


class QftOFTLinear(oft_layer.Linear):
    """PEFT's OFT layer over a QuantLinear; one active adapter runs through qft's fused ``oft_linear``
    (the rotation inside the quantized matmul), merging through ``QftBackend``."""

    def __init__(self, base_layer, adapter_name: str, config, **kwargs) -> None:
        with _known_layer():
            super().__init__(base_layer, adapter_name, config, **kwargs)
        self.quantization_backend = QftBackend()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """PEFT's OFT forward; one active adapter on an unmerged, unpermuted layer is fused."""
        base = self.get_base_layer()
        active = [name for name in self.active_adapters if name in self.oft_R]
        if self.disable_adapters or self.merged or len(active) != 1 or base.input_perm is not None:
            return super().forward(x, *args, **kwargs)
        rotation = self.oft_R[active[0]]
        if rotation.coft:
            with torch.no_grad():
                rotation.weight.copy_(rotation._project_batch(rotation.weight, eps=rotation.eps))
        return oft_linear(
            x,
            base.quantized,
            rotation.weight,
            rotation.block_size,
            base.bias,
            rotation.num_cayley_neumann_terms,
            rotation.use_cayley_neumann,
        )


class TunerLayerSwap:
    """Swaps a PEFT tuner module's private ``_get_tuner_layer_class`` for one that returns ``qft_layer``
    for QuantLinear bases and PEFT's own answer for every other layer (OFT and BOFT have no public hook)."""

    def __init__(self, tuner_model_module, qft_layer: type) -> None:
        self.module, self.qft_layer = tuner_model_module, qft_layer
        self.peft_function = tuner_model_module._get_tuner_layer_class

    def _layer_class(self, target_base_layer: nn.Module):
        if isinstance(target_base_layer, QuantLinear):
            return self.qft_layer
        return self.peft_function(target_base_layer)

    def enable(self) -> None:
        """Install the swap (idempotent)."""
        self.module._get_tuner_layer_class = self._layer_class

    def disable(self) -> None:
        """Restore PEFT's function."""
        self.module._get_tuner_layer_class = self.peft_function


_OFT_SWAP = TunerLayerSwap(oft_model, QftOFTLinear)


def enable_oft() -> None:
    """Opt in: PEFT's OFT wraps QuantLinear layers in ``QftOFTLinear`` (patches PEFT's private
    ``peft.tuners.oft.model._get_tuner_layer_class``; every other layer type is unchanged)."""
    _OFT_SWAP.enable()


def disable_oft() -> None:
    """Undo ``enable_oft``."""
    _OFT_SWAP.disable()
