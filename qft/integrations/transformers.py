"""transformers backend: ``QftConfig`` and its quantizer, registered under ``quant_method="qft"``.

``AutoModelForCausalLM.from_pretrained(path, quantization_config=QftConfig(format="nf4"))`` builds
``QuantLinear`` skeletons (meta tensors) in place of every ``nn.Linear`` (and GPT-2's ``Conv1D``)
but the output head, then
quantizes each float weight as it is read (one layer in float at a time). ``save_pretrained`` writes
the layers' bitsandbytes-style entries (``weight``, ``weight.absmax``, ...; see ``qft.nn.QuantLinear``)
and the config; such a checkpoint loads back with plain ``from_pretrained`` (after ``import qft``),
each layer rebuilt from its own entries. ``from_bnb_pretrained`` loads a bitsandbytes 4-bit checkpoint
into qft layers without re-quantizing.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, build_glob_alternation
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from qft import formats
from qft.interop import bitsandbytes as bnb_layout
from qft.nn.config import QuantConfig
from qft.nn.quant_linear import PART_BUFFERS, QuantLinear
from qft.tensor import QuantizedTensor

METHOD = "qft"
_ENTRIES = bnb_layout.layer_entries()


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype) or name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"compute_dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return name


@register_quantization_config(METHOD)
class QftConfig(QuantizationConfigMixin):
    """How ``from_pretrained`` quantizes a model with qft (stored in ``config.json``).

    Args:
        format / block_size / double_quant / method: as ``qft.QuantConfig`` (checked here).
        compute_dtype: float32, float16 or bfloat16: the dtype the model is loaded in and computes in
            (qft layers follow their input's dtype); None leaves it to ``from_pretrained``.
        modules_to_not_convert: module names left in float (default: the output head, as transformers
            picks it).
    """

    def __init__(
        self,
        format: str = "nf4",
        block_size: int = formats.DEFAULT_BLOCK_SIZE,
        double_quant: bool = True,
        method: str = "hqq",
        compute_dtype=None,
        modules_to_not_convert: list[str] | None = None,
        **kwargs,
    ) -> None:
        self.quant_method = METHOD
        # ValueError/TypeError on a bad combination; the format it stores (method "icq": a code book's _icq)
        format = QuantConfig(format, block_size, double_quant, method).format
        self.format, self.block_size, self.double_quant, self.method = format, block_size, double_quant, method
        self.compute_dtype = _dtype_name(compute_dtype)
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        unknown = set(kwargs) - {"quant_method"}
        if unknown:
            raise TypeError(f"QftConfig got unknown arguments {sorted(unknown)}")

    @property
    def quant_config(self) -> QuantConfig:
        """The layer-level ``qft.QuantConfig``."""
        return QuantConfig(self.format, self.block_size, self.double_quant, self.method)


def _entry_of(key: str) -> str | None:
    """Which of a quantized layer's entries ``key`` ends with (``weight``, ``weight.absmax``, ...)."""
    matches = [entry for entry in _ENTRIES if key == entry or key.endswith("." + entry)]
    return max(matches, key=len) if matches else None


def _layer_of(model: nn.Module, key: str) -> tuple[str, nn.Module | None]:
    """(module name, module) owning a ``<module>.weight[.<part>]`` entry, or None when there is none."""
    entry = _entry_of(key)
    name = key[: -len(entry) - 1] if entry else key.rpartition(".")[0]
    try:
        return name, model.get_submodule(name)
    except AttributeError:
        return name, None


_PART_BUFFERS = set(PART_BUFFERS)


def _mark_loaded(hf_quantizer: QftHfQuantizer, module: QuantLinear, name: str, missing_keys) -> None:
    """Record a filled layer. Its parts are non-persistent buffers, which transformers replaces by empty
    tensors after loading (it expects them to be re-initialized, as for rotary tables); they count as
    persistent until ``_process_model_after_weight_loading`` so they survive that step."""
    hf_quantizer.loaded.add(name)
    module._non_persistent_buffers_set -= _PART_BUFFERS
    for part in _PART_BUFFERS:  # models' _init_weights (GPT-2's reaches into c_proj.weight) must skip them
        if getattr(module, part) is not None:
            getattr(module, part)._is_hf_initialized = True
    if missing_keys is not None:
        for key in [k for k in missing_keys if k.startswith(name + ".weight")]:
            missing_keys.discard(key)


class _QuantizerOp(ConversionOps):
    def __init__(self, hf_quantizer: QftHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo):
        # The loader deep-copies each converter; every copy must report to the one quantizer.
        return type(self)(self.hf_quantizer)


class _QftQuantize(_QuantizerOp):
    """Quantize a float checkpoint weight straight into its QuantLinear skeleton."""

    def convert(self, input_dict, model=None, missing_keys=None, **kwargs):
        results = {}
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            name, module = _layer_of(model, key)
            if not isinstance(module, QuantLinear):
                results[key] = value
                continue
            # Quantized like the skeleton (the config's format, block size, double quantization).
            module.load_quantized_state({"weight": value}, self.hf_quantizer.quantization_config.method)
            _mark_loaded(self.hf_quantizer, module, name, missing_keys)
        return results


class _QftDeserialize(_QuantizerOp):
    """Rebuild a QuantLinear from its checkpoint entries (qft or bitsandbytes layout)."""

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        name, module = _layer_of(model, full_layer_name)
        if not isinstance(module, QuantLinear):  # a float weight of a layer qft does not quantize
            # It reaches this op because its name ends in "weight", and loaders leave an op's inputs
            # uncast: cast it here as transformers would, keep_in_fp32 modules included.
            dtype = self.hf_quantizer.float_dtype_for(model, full_layer_name)
            return {
                k: [t.to(dtype) if t.is_floating_point() else t for t in (v if isinstance(v, list) else [v])]
                for k, v in input_dict.items()
            }
        state = {}
        for key, value in input_dict.items():
            part = _entry_of(key)  # entries arrive by pattern or by full name
            if part is None:
                raise ValueError(f"unexpected checkpoint entry {key!r} for a quantized layer")
            state[part] = value[0] if isinstance(value, list) else value
        config = self.hf_quantizer.quantization_config
        try:
            module.load_quantized_state(state)
            if (module.format, module.block_size) != (config.format, config.block_size):
                raise ValueError(
                    f"stored as {module.format} with block size {module.block_size}, but the config "
                    f"says {config.format} with block size {config.block_size}"
                )
        except (ValueError, KeyError, TypeError) as exc:
            self.hf_quantizer.errors[name] = str(exc)
            raise
        _mark_loaded(self.hf_quantizer, module, name, missing_keys)
        return {}

    @property
    def reverse_op(self) -> ConversionOps:
        """Saving needs no conversion back: a QuantLinear's state dict already holds its checkpoint
        entries under the names this op reads."""
        return _AsStored()


class _AsStored(ConversionOps):
    """The save-time reverse of ``_QftDeserialize``: the entries as the layer's state dict has them."""

    def convert(self, input_dict, **kwargs):
        return input_dict


@register_quantizer(METHOD)
class QftHfQuantizer(HfQuantizer):
    """transformers' side of qft: skeleton layers before loading, quantize or deserialize while loading,
    checks after. Trainable (adapters on top), serializable, compileable."""

    requires_calibration = False
    serialized_names: ClassVar[dict[str, list[str]]] = {"weight": _ENTRIES}

    def __init__(self, quantization_config: QftConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self.errors: dict[str, str] = {}
        self.loaded: set[str] = set()
        self.model_dtype = torch.float32  # set by update_dtype before the model is built
        self._fp32_plan = None  # (dtype plan, its compiled pattern), built by float_dtype_for

    def update_dtype(self, dtype):
        """The model's dtype: the config's compute_dtype when set (qft layers compute in their input's
        dtype, so this is what they compute in), else what transformers chose, else float32."""
        if self.quantization_config.compute_dtype is not None:
            dtype = getattr(torch, self.quantization_config.compute_dtype)
        self.model_dtype = torch.float32 if dtype is None else dtype
        return self.model_dtype

    def float_dtype_for(self, model, name: str) -> torch.dtype:
        """The dtype transformers gives the float parameter ``name``: the model's, or fp32 for the
        modules its dtype plan keeps in fp32 (``_keep_in_fp32_modules``)."""
        if self._fp32_plan is None:  # once per load: the model and its dtype are fixed by then
            plan = model._get_dtype_plan(self.model_dtype)
            self._fp32_plan = (plan, build_glob_alternation(list(plan))[:2] if plan else None)
        plan, compiled = self._fp32_plan
        if compiled is not None:
            pattern, group_to_glob = compiled
            match = pattern.search(name)
            if match is not None:
                return plan[group_to_glob[match.lastgroup]]
        return self.model_dtype

    def update_device_map(self, device_map):
        """Everything on the current GPU when none is given (CPU without one)."""
        if device_map is None:
            return {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
        return device_map

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        """True for the float ``weight`` of a layer that becomes a QuantLinear."""
        name, leaf = param_name.rpartition(".")[::2]
        if leaf != "weight" or self.pre_quantized:
            return False
        try:
            return isinstance(model.get_submodule(name), QuantLinear)
        except AttributeError:
            return False

    def _process_model_before_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        skip = self.get_modules_to_not_convert(model, config.modules_to_not_convert, model._keep_in_fp32_modules)
        weight_dtype = self.model_dtype
        for name, module in list(model.named_modules()):
            if type(module) not in (nn.Linear, Conv1D) or not should_convert_module(name, skip):
                continue
            conv = type(module) is Conv1D  # GPT-2's linear: weight stored [in, out]
            shape = (module.nf, module.weight.shape[0]) if conv else (module.out_features, module.in_features)
            qt = QuantizedTensor.empty(shape, weight_dtype, config.format, config.block_size, config.double_quant)
            layer = QuantLinear(qt, None if module.bias is None else module.bias.to("meta"))
            layer._transpose_float_weight = conv  # a float checkpoint holds Conv1D's [in, out] weight
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, layer)

    def _process_model_after_weight_loading(self, model, **kwargs):
        layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        unloaded = sorted(set(layers) - self.loaded)
        if self.errors or unloaded:
            details = "; ".join(f"{n}: {e}" for n, e in self.errors.items()) or f"no weight for {unloaded[:5]}"
            raise ValueError(f"qft could not load the quantized layers: {details}")
        for module in layers.values():
            module._non_persistent_buffers_set |= _PART_BUFFERS  # back to QuantLinear's own state-dict layout
            if module.bias is not None:
                module.bias.requires_grad_(False)  # frozen like the weight, as QuantLinear keeps it
        return model

    def get_quantize_ops(self):
        """The op quantizing each float weight as it is read."""
        return _QftQuantize(self)

    def get_load_operations(self) -> dict:
        """The op rebuilding each quantized layer from its checkpoint entries."""
        return {"deserialize": _QftDeserialize}

    def is_serializable(self):
        """qft checkpoints save and load back."""
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters train on top of qft layers."""
        return True

    @property
    def is_compileable(self) -> bool:
        """qft layers are custom ops with fakes: torch.compile traces them."""
        return True


def from_bnb_pretrained(model_class, path, **kwargs):
    """Load a checkpoint saved with bitsandbytes 4-bit (nf4/fp4) into qft layers, bytes unchanged.

    ``model_class`` is e.g. ``AutoModelForCausalLM``; ``kwargs`` go to its ``from_pretrained``.
    transformers would otherwise hand such a checkpoint to bitsandbytes' quantizer.
    """
    from transformers import AutoConfig

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
    bnb = getattr(config, "quantization_config", None)
    bnb = bnb.to_dict() if hasattr(bnb, "to_dict") else bnb
    if not isinstance(bnb, dict) or not bnb.get("load_in_4bit"):
        raise ValueError(f"{path} is not a bitsandbytes 4-bit checkpoint (quantization_config: {bnb!r})")
    qft_config = QftConfig(
        format=bnb.get("bnb_4bit_quant_type", "nf4"),
        block_size=formats.DEFAULT_BLOCK_SIZE,
        double_quant=bool(bnb.get("bnb_4bit_use_double_quant", False)),
        modules_to_not_convert=bnb.get("llm_int8_skip_modules"),
    )
    # bitsandbytes' compute dtype is not the model's dtype (its default is float32): the caller's
    # ``dtype`` argument decides that, as for any checkpoint.
    config.quantization_config = qft_config.to_dict()
    return model_class.from_pretrained(path, config=config, **kwargs)
