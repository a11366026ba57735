"""OFTConfig (what users hold) and OFTLinear: a frozen base layer whose input is rotated by a trainable
block-diagonal orthogonal matrix, PEFT's OFT (>= 0.18, input-centric, Cayley-Neumann)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
from torch import nn

from qft.adapters import TargetedConfig, attach_base, checked_targets, quantized_weight, transform_base_weight
from qft.adapters.oft.function import coft_project, oft_linear, oft_rotation, rotate


@dataclass(frozen=True)
class OFTConfig(TargetedConfig):
    """OFT adapters as PEFT defines them (``oft_R.weight`` [in/b, b(b-1)/2], zero init = identity).

    Attributes:
        block_size: b; must divide every target's in_features (PEFT would silently pick another b;
            qft refuses, naming the layer). cayley_neumann_terms / use_cayley_neumann: R's
            parametrization. block_share: one R for all blocks. coft / eps: project each block's Q onto
            the ball of radius eps / sqrt(r) before every forward. target_modules: PEFT's name matching.
    """

    block_size: int = 32
    cayley_neumann_terms: int = 5
    use_cayley_neumann: bool = True
    block_share: bool = False
    coft: bool = False
    eps: float = 6e-5
    target_modules: tuple[str, ...] | str = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 2:
            raise ValueError(f"block_size must be an int >= 2, got {self.block_size!r}")
        n = self.cayley_neumann_terms
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"cayley_neumann_terms must be a positive int, got {n!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real) or self.eps <= 0:
            raise ValueError(f"eps must be a positive number, got {self.eps!r}")
        object.__setattr__(self, "target_modules", checked_targets(self.target_modules))


class _Rotation(nn.Module):
    """Holds ``weight`` so the state-dict key is PEFT's ``oft_R.weight``."""

    def __init__(self, rows: int, block_size: int, device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, block_size * (block_size - 1) // 2, device=device))


class OFTLinear(nn.Module):
    """``base_layer(rotate(x))`` with R block-diagonal and orthogonal; a fresh adapter is the identity."""

    def __init__(self, base_layer: nn.Module, config: OFTConfig) -> None:
        super().__init__()
        attach_base(self, base_layer, config, OFTConfig)
        if base_layer.in_features % config.block_size:
            raise ValueError(
                f"OFT block_size {config.block_size} does not divide in_features {base_layer.in_features} "
                "(PEFT would silently change it; qft refuses: pick a divisor)"
            )
        self.blocks = self.in_features // config.block_size
        device = base_layer.weight.device
        self.oft_R = _Rotation(1 if config.block_share else self.blocks, config.block_size, device)
        self.merged = False

    def rotation(self) -> torch.Tensor:
        """R for every block ``[in/b, b, b]`` (fp32, differentiable)."""
        c = self.config
        return oft_rotation(self.oft_R.weight, c.block_size, self.blocks, c.cayley_neumann_terms, c.use_cayley_neumann)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in] -> [..., out]`` in x's dtype."""
        if self.merged:
            return self.base_layer(x)
        c = self.config
        if c.coft:
            with torch.no_grad():
                self.oft_R.weight.copy_(coft_project(self.oft_R.weight, c.block_size, c.eps))
        base = self.base_layer
        qt = quantized_weight(base)
        if qt is not None and base.input_perm is None:
            return oft_linear(
                x, qt, self.oft_R.weight, c.block_size, base.bias, c.cayley_neumann_terms, c.use_cayley_neumann
            )
        # nn.Linear, or an act-order layer (it permutes the rotated input): rotate, then the base layer.
        return base(rotate(x, self.rotation()))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold R into the base weight, W' = W R_bd^T (a 4-bit base is re-quantized: lossy)."""
        if self.merged:
            return
        rot = torch.block_diag(*self.rotation())
        transform_base_weight(self.base_layer, lambda w: w @ rot.t())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` with R's inverse (R^T for an orthogonal R)."""
        if not self.merged:
            return
        rot = torch.block_diag(*self.rotation())
        transform_base_weight(self.base_layer, lambda w: w @ torch.linalg.inv(rot.t()))
        self.merged = False

    def extra_repr(self) -> str:
        """Block size, block count, Cayley-Neumann terms and whether the adapter is merged."""
        c = self.config
        return f"block_size={c.block_size}, blocks={self.blocks}, n={c.cayley_neumann_terms}, merged={self.merged}"
