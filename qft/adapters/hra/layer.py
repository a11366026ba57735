"""HRAConfig (what users hold) and HRALinear: a frozen base layer whose input is reflected by a chain
of Householder reflections, PEFT's HRA (``hra_u`` [in, r])."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from qft.adapters import TargetedConfig, attach_base, checked_targets, transform_base_weight
from qft.adapters.hra.function import delta_matrix, householder


@dataclass(frozen=True)
class HRAConfig(TargetedConfig):
    """HRA adapters as PEFT defines them (field names and defaults are PEFT's ``HRAConfig``'s).

    Attributes:
        r: reflections per layer. apply_GS: orthonormalise the vectors (Gram-Schmidt) and use
            ``I - 2 U U^T`` instead of the chain. init_weights: PEFT's start: with an even r, pairs of
            equal vectors (the chain is the identity); with an odd r, or False, random vectors.
        target_modules: PEFT's name matching.
    """

    r: int = 8
    apply_GS: bool = False  # PEFT's field name
    init_weights: bool = True
    target_modules: tuple[str, ...] | str = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        for name in ("apply_GS", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        object.__setattr__(self, "target_modules", checked_targets(self.target_modules))


class HRALinear(nn.Module):
    """``base_layer(x H^T)``: PEFT's HRA layer (``W' = W H``) applied on the input side."""

    def __init__(self, base_layer: nn.Module, config: HRAConfig) -> None:
        super().__init__()
        attach_base(self, base_layer, config, HRAConfig)
        self.hra_u = nn.Parameter(torch.empty(self.in_features, config.r, device=base_layer.weight.device))
        self._init_vectors()
        self.merged = False

    @torch.no_grad()
    def _init_vectors(self) -> None:
        r = self.config.r
        if self.config.init_weights and r % 2 == 0:  # pairs of equal reflections: the identity
            half = torch.empty(self.in_features, r // 2, device=self.hra_u.device)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            self.hra_u.copy_(torch.repeat_interleave(half, 2, dim=1))
            return
        if self.config.init_weights:
            warnings.warn("HRA with an odd r cannot start at the identity: random vectors (as PEFT)", stacklevel=3)
        nn.init.kaiming_uniform_(self.hra_u, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in] -> [..., out]`` in x's dtype."""
        if self.merged:
            return self.base_layer(x)
        return self.base_layer(householder(x, self.hra_u, self.config.apply_GS))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold H into the base weight, ``W' = W H`` (a quantized base is re-quantized: lossy)."""
        if not self.merged:
            h = delta_matrix(self.hra_u, self.config.apply_GS)
            transform_base_weight(self.base_layer, lambda w: w @ h)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` with H^T (H is orthogonal)."""
        if self.merged:
            h = delta_matrix(self.hra_u, self.config.apply_GS)
            transform_base_weight(self.base_layer, lambda w: w @ h.t())
            self.merged = False

    def extra_repr(self) -> str:
        """r, Gram-Schmidt and whether merged."""
        return f"r={self.config.r}, apply_GS={self.config.apply_GS}, merged={self.merged}"
