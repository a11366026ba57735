"""Frozen configs users hold: how to quantize (QuantConfig) and which LoRA adapters to add (LoRAConfig)."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
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
        ``"." + target``), or one string, a regular expression a whole module name must match (as
        PEFT reads a string). rank_pattern / alpha_pattern: PEFT's per-module overrides of r and alpha,
        ``{pattern: value}``; a pattern applies to a module whose name ends in it (after a ``.``), the
        first that matches wins. adapter_dtype: dtype of A and B (fp32 by default, as PEFT keeps them).
        init: ``"default"`` (PEFT's: A kaiming-uniform, B zero) or ``"loftq"`` (quantize the target
        and fit A, B to the quantization residual; needs full-precision targets and a QuantConfig
        passed to ``add_adapters``). loftq_iters: LoftQ's alternating rounds.
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
                _compile(pattern, name)
                bad = isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                if bad or (kind == "rank" and (not isinstance(value, int) or value <= 0)):
                    want = "positive int" if kind == "rank" else "finite number"
                    raise ValueError(f"{name}[{pattern!r}] must be a {want}, got {value!r}")
            object.__setattr__(self, name, pairs)
        if self.adapter_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"adapter_dtype must be a floating dtype, got {self.adapter_dtype}")
        if self.init not in ("default", "loftq"):
            raise ValueError(f"init must be 'default' or 'loftq', got {self.init!r}")
        if isinstance(self.loftq_iters, bool) or not isinstance(self.loftq_iters, int) or self.loftq_iters < 1:
            raise ValueError(f"loftq_iters must be a positive int, got {self.loftq_iters!r}")

    @property
    def scaling(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (patterns aside: see ``scaling_for``)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def matches(self, name: str) -> bool:
        """True when module ``name`` is one of the targets (PEFT's rules: a whole-name regular
        expression for a string, else equal to or ending in ``"." + target``)."""
        return target_matches(self.target_modules, name)

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


def checked_targets(targets) -> str | tuple[str, ...]:
    """PEFT's ``target_modules``: one string (a regular expression) or a non-empty list of names."""
    if isinstance(targets, str):
        _compile(targets, "target_modules")
        return targets
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must name at least one module, got {targets!r}")
    return targets


def target_matches(targets: str | tuple[str, ...], name: str) -> bool:
    """PEFT's rule: a string must match the whole module name; a name must equal it or end it after a dot."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _compile(pattern, what: str) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{what} patterns must be non-empty strings, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what}: {pattern!r} is not a regular expression: {exc}") from None


def _pattern_value(pairs, name: str, default):
    """PEFT's pattern lookup: the first pattern that matches the end of ``name`` (after a ``.``)."""
    for pattern, value in pairs:
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default
