"""LoRAConfig (what users hold) and LoRALinear: a frozen base layer plus trainable adapters A and B."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from qft.adapters import (
    AdditiveMerge,
    QuantizeWith,
    TargetedConfig,
    attach_base,
    check_adapter_dtype,
    checked_targets,
    compile_pattern,
    quantized_weight,
)
from qft.adapters.lora.apiq import apiq
from qft.adapters.lora.function import loftq, lora_over

INITS = ("default", "loftq", "apiq")


@dataclass(frozen=True)
class LoRAConfig(TargetedConfig):
    """LoRA adapters as PEFT defines them: ``y += scaling * B(A(dropout(x)))``.

    Attributes:
        r: rank (> 0). alpha: scale numerator; ``scaling = alpha / r`` (``alpha / sqrt(r)`` with
        ``use_rslora``). dropout: probability in [0, 1) on the adapter input while training.
        target_modules: module names or name suffixes (PEFT's matching: equal, or ending in
        ``"." + target``), or one string, a regular expression a whole module name must match (as
        PEFT reads a string). rank_pattern / alpha_pattern: PEFT's per-module overrides of r and alpha,
        ``{pattern: value}``; a pattern applies to a module whose name ends in it (after a ``.``), the
        first that matches wins. adapter_dtype: dtype of A and B (fp32 by default, as PEFT keeps them).
        init: ``"default"`` (PEFT's: A kaiming-uniform, B zero), ``"loftq"`` (quantize the target
        and fit A, B to the quantization residual) or ``"apiq"`` (quantize the target and fit A, B so
        the layer's output on calibration inputs is kept: ``lora.apiq``; needs ``add_adapters``'s
        ``calibration``). Both need full-precision targets and a QuantConfig passed to ``add_adapters``.
        loftq_iters: LoftQ's (and ApiQ's) alternating rounds.
        iec: IR-QLoRA's information elastic connections (Qin et al. 2024): two trained scalars, zero at
        start, add the means of r groups of input features to ``A x`` and repeat each of the r values of
        ``A x`` over a group of outputs beside ``B``; r must divide both feature counts. As LoRA with
        ``A + a G`` and ``B + b E`` (G averages groups, E repeats), so every fused path runs it. With
        dropout the group means see the dropped input (IR-QLoRA's code takes them of the undropped one).
        Its files keep PEFT's LoRA layout plus ``<module>.lora_iec`` and ``"iec": true``: PEFT, which has
        no IEC, would drop the scalars.
    """

    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = field(default_factory=tuple)
    use_rslora: bool = False
    adapter_dtype: torch.dtype = torch.float32
    init: str = "default"
    loftq_iters: int = 4
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    iec: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "target_modules", checked_targets(self.target_modules))
        # Kept as (pattern, value) pairs in order: the config stays hashable, the first match wins.
        for name, kind in (("rank_pattern", "rank"), ("alpha_pattern", "alpha")):
            pairs = tuple(dict(getattr(self, name)).items())
            for pattern, value in pairs:
                compile_pattern(pattern, name)
                bad = isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                if bad or (kind == "rank" and (not isinstance(value, int) or value <= 0)):
                    want = "positive int" if kind == "rank" else "finite number"
                    raise ValueError(f"{name}[{pattern!r}] must be a {want}, got {value!r}")
            object.__setattr__(self, name, pairs)
        check_adapter_dtype(self.adapter_dtype)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if isinstance(self.loftq_iters, bool) or not isinstance(self.loftq_iters, int) or self.loftq_iters < 1:
            raise ValueError(f"loftq_iters must be a positive int, got {self.loftq_iters!r}")
        if not isinstance(self.iec, bool):
            raise TypeError(f"iec must be a bool, got {self.iec!r}")

    @property
    def scaling(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (patterns aside: see ``scaling_for``)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_for(self, name: str) -> int:
        """Module ``name``'s rank: its ``rank_pattern`` entry, else ``r``."""
        return _pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        """Module ``name``'s alpha: its ``alpha_pattern`` entry, else ``alpha``."""
        return _pattern_value(self.alpha_pattern, name, self.alpha)

    def scaling_for(self, name: str) -> float:
        """Module ``name``'s scaling, from its rank and alpha."""
        r = self.rank_for(name)
        return self.alpha_for(name) / (math.sqrt(r) if self.use_rslora else r)


def _pattern_value(pairs, name: str, default):
    """PEFT's pattern lookup: the first pattern that matches the end of ``name`` (after a ``.``)."""
    for pattern, value in pairs:
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


class LoRALinear(AdditiveMerge, nn.Module):
    """``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))``, PEFT's LoRA layer.

    ``lora_A`` / ``lora_B`` are ``nn.Linear`` without bias (``lora_A.weight`` [r, in], ``lora_B.weight``
    [out, r]) in ``config.adapter_dtype``, initialised as PEFT does: A kaiming-uniform(a=sqrt(5)),
    B zero, so a fresh adapter leaves the output unchanged. Over a QuantLinear the whole layer runs
    as one fused ``lora_linear``.
    """

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, name: str = "") -> None:
        super().__init__()
        attach_base(self, base_layer, config, LoRAConfig)
        # self.config: the model-wide config; ``name`` picks this layer's rank_pattern / alpha_pattern entry
        self.r = config.rank_for(name)
        kwargs = {"bias": False, "device": base_layer.weight.device, "dtype": config.adapter_dtype}
        self.lora_A = nn.Linear(self.in_features, self.r, **kwargs)
        self.lora_B = nn.Linear(self.r, self.out_features, **kwargs)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_iec = None
        if config.iec:
            for side, features in (("in", self.in_features), ("out", self.out_features)):
                if features % self.r:
                    raise ValueError(f"iec needs r={self.r} to divide {name or 'the layer'}'s {features} {side}puts")
            self.lora_iec = nn.Parameter(torch.zeros(2, device=kwargs["device"], dtype=config.adapter_dtype))
        self.scaling = config.scaling_for(name)
        self.merged = False

    @classmethod
    def with_quantizing_init(
        cls, linear: nn.Linear, config: LoRAConfig, quantize: QuantizeWith, name: str = ""
    ) -> LoRALinear:
        """Quantize ``linear`` as ``quantize`` says and start A, B from ``config.init``: LoftQ
        (``function.loftq``) or ApiQ (``apiq.apiq``, from the layer's calibration statistics)."""
        own = dataclasses.replace(
            config, r=config.rank_for(name), alpha=config.alpha_for(name), rank_pattern={}, alpha_pattern={}
        )
        hessian = quantize.hessian(name)
        quant = quantize.config_for(name)
        if hessian is None and (config.init == "apiq" or quant.method == "gptq"):
            why = "init='apiq'" if config.init == "apiq" else "method 'gptq'"
            raise ValueError(f"{why} needs calibration statistics for {name!r} (qft.nn.calibrate)")
        if config.init == "apiq":
            qt, a, b = apiq(linear.weight, hessian, quant, own)
        else:
            qt, a, b = loftq(linear.weight, quant, own, hessian)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        layer = cls(quantize.wrap(qt, bias), config, name)
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in] -> [..., out]`` in x's dtype (with the layers it shares x with, once
        ``qft.nn.fuse_projections`` has grouped them)."""
        group = self.__dict__.get("projection_group")
        if group is not None:
            return group(self, x)
        return self.forward_alone(x)

    def forward_alone(self, x: torch.Tensor) -> torch.Tensor:
        """This layer's output computed by itself."""
        if self.merged:
            return self.base_layer(x)
        dropout = self.config.dropout if self.training else 0.0
        base = self.base_layer
        a, b = self.factors()
        qt = quantized_weight(base)
        if qt is not None:
            return lora_over(base, x, a, b, self.scaling, dropout, qt)
        y = base(x)
        x_lora = nn.functional.dropout(x, dropout, self.training).to(a.dtype)
        return y + ((x_lora @ a.t()) @ b.t() * self.scaling).to(y.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])`` as the layer applies them: its own, or with IEC's connections
        ``A + a G`` (G [r, in]: 1 / group size on each input group) and ``B + b E`` (E [out, r]: 1 where
        output o belongs to group o // (out / r))."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if self.lora_iec is None:
            return a, b
        groups = torch.arange(self.r, device=a.device)
        inputs = torch.arange(self.in_features, device=a.device) // (self.in_features // self.r)
        outputs = torch.arange(self.out_features, device=a.device) // (self.out_features // self.r)
        average = (inputs[None, :] == groups[:, None]).to(a.dtype) * (self.r / self.in_features)
        repeat = (outputs[:, None] == groups[None, :]).to(b.dtype)
        return a + self.lora_iec[0] * average, b + self.lora_iec[1] * repeat

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32 (IEC's factors when it has them): what merging adds to the base weight."""
        a, b = self.factors()
        return self.scaling * (b.float() @ a.float())

    def extra_repr(self) -> str:
        """Rank, scaling, dropout and whether the adapter is merged."""
        iec = ", iec=True" if self.lora_iec is not None else ""
        return f"r={self.r}, scaling={self.scaling:g}, dropout={self.config.dropout}{iec}, merged={self.merged}"
