"""DiaBloConfig (what users hold) and DiaBloLinear: a frozen base layer plus trainable diagonal blocks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qft.adapters import (
    AdditiveMerge,
    TargetedConfig,
    attach_base,
    check_adapter_dtype,
    checked_targets,
    quantized_weight,
)
from qft.adapters.diablo.function import diablo_linear
from qft.reference import blockdiag_linear


@dataclass(frozen=True)
class DiaBloConfig(TargetedConfig):
    """DiaBlo adapters (Sun et al. 2025): ``W + blockdiag(D_1, ..., D_N)``, D zero at the start.

    Attributes:
        blocks: N, the number of diagonal blocks; must divide every target's in_features and
            out_features (each block is [out / N, in / N]; the update holds out * in / N values).
        target_modules: PEFT's name matching (names or suffixes, or one regular expression).
        adapter_dtype: D's dtype (fp32 by default, as PEFT keeps adapters).
    """

    blocks: int = 64
    target_modules: tuple[str, ...] | str = field(default_factory=tuple)
    adapter_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1:
            raise ValueError(f"blocks must be a positive int, got {self.blocks!r}")
        check_adapter_dtype(self.adapter_dtype)
        object.__setattr__(self, "target_modules", checked_targets(self.target_modules))


class _Blocks(nn.Module):
    """Holds ``weight`` [N, out/N, in/N] so the state-dict key is ``diablo_D.weight``."""

    def __init__(self, blocks: int, rows: int, cols: int, device, dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(blocks, rows, cols, device=device, dtype=dtype))


class DiaBloLinear(AdditiveMerge, nn.Module):
    """``base_layer(x) + [x_1 D_1^T | ... | x_N D_N^T]``; a fresh adapter (D = 0) leaves the output unchanged."""

    def __init__(self, base_layer: nn.Module, config: DiaBloConfig) -> None:
        super().__init__()
        attach_base(self, base_layer, config, DiaBloConfig)
        n = config.blocks
        if base_layer.in_features % n or base_layer.out_features % n:
            raise ValueError(
                f"DiaBlo blocks {n} must divide in_features {base_layer.in_features} and "
                f"out_features {base_layer.out_features}"
            )
        rows, cols = self.out_features // n, self.in_features // n
        self.diablo_D = _Blocks(n, rows, cols, base_layer.weight.device, config.adapter_dtype)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in] -> [..., out]`` in x's dtype."""
        if self.merged:
            return self.base_layer(x)
        base, d = self.base_layer, self.diablo_D.weight
        qt = quantized_weight(base)
        if qt is not None and base.input_perm is None:
            return diablo_linear(x, qt, d, base.bias)
        # nn.Linear, or an act-order layer (it permutes its own input; D acts on x's own order)
        y = base(x)
        delta = blockdiag_linear(x.reshape(-1, self.in_features), d).view(*x.shape[:-1], self.out_features)
        return (y.to(d.dtype) + delta).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``blockdiag(D_1, ..., D_N)`` [out, in] in fp32: what merging adds to the base weight."""
        return torch.block_diag(*self.diablo_D.weight.float())

    def extra_repr(self) -> str:
        """Block count and shape, and whether the adapter is merged."""
        _, rows, cols = self.diablo_D.weight.shape
        return f"blocks={self.config.blocks}, block=[{rows}, {cols}], merged={self.merged}"
