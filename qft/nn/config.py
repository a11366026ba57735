"""Frozen configs users hold: how to quantize (QuantConfig) and which LoRA adapters to add (LoRAConfig)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from qft import formats


@dataclass(frozen=True)
class QuantConfig:
    """How ``quantize_`` / ``QuantLinear.from_linear`` store a weight.

    Attributes:
        format: a name in ``qft.formats.FORMATS``: ``"nf4"`` (default), ``"fp4"``, ``"lloyd3"``,
            ``"lloyd2"``, ``"int4"``, ``"int3"``, ``"int2"``.
        block_size: values per scale block (default 64; affine groups 32/64/128).
        double_quant: also quantize the scales to 8 bits (default True; 4.127 bits/param for nf4/64).
        method: affine formats: ``"rtn"``, ``"clip"`` or ``"hqq"`` (default).
    """

    format: str = "nf4"
    block_size: int = formats.DEFAULT_BLOCK_SIZE
    double_quant: bool = True
    method: str = "hqq"

    def __post_init__(self) -> None:
        formats.get_format(self.format)
        formats.check_block_size(self.block_size, self.format)
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {self.double_quant!r}")
        if self.method not in ("rtn", "clip", "hqq"):
            raise ValueError(f"method must be 'rtn', 'clip' or 'hqq', got {self.method!r}")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters as PEFT defines them: ``y += scaling * B(A(dropout(x)))``.

    Attributes:
        r: rank (> 0). alpha: scale numerator; ``scaling = alpha / r`` (``alpha / sqrt(r)`` with
        ``use_rslora``). dropout: probability in [0, 1) on the adapter input while training.
        target_modules: module names or name suffixes (PEFT's matching: equal, or ending in
        ``"." + target``). adapter_dtype: dtype of A and B (fp32 by default, as PEFT keeps them).
        init: ``"default"`` (PEFT's: A kaiming-uniform, B zero) or ``"loftq"`` (quantize the target
        and fit A, B to the quantization residual; needs full-precision targets and a QuantConfig
        passed to ``add_adapters``). loftq_iters: LoftQ's alternating rounds.
    """

    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default_factory=tuple)
    use_rslora: bool = False
    adapter_dtype: torch.dtype = torch.float32
    init: str = "default"
    loftq_iters: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"target_modules must name at least one module, got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", targets)
        if self.adapter_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"adapter_dtype must be a floating dtype, got {self.adapter_dtype}")
        if self.init not in ("default", "loftq"):
            raise ValueError(f"init must be 'default' or 'loftq', got {self.init!r}")
        if isinstance(self.loftq_iters, bool) or not isinstance(self.loftq_iters, int) or self.loftq_iters < 1:
            raise ValueError(f"loftq_iters must be a positive int, got {self.loftq_iters!r}")

    @property
    def scaling(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def matches(self, name: str) -> bool:
        """True when module ``name`` is one of the targets (PEFT's suffix rule)."""
        return any(name == t or name.endswith("." + t) for t in self.target_modules)
