"""BOFTConfig (what users hold) and BOFTLinear: a frozen base layer whose input is multiplied by a
trainable butterfly of orthogonal blocks and whose output rows are scaled, PEFT's BOFT."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
from torch import nn

from qft.adapters import (
    TargetedConfig,
    attach_base,
    checked_targets,
    quantized_weight,
    transform_base_weight,
)
from qft.adapters.boft.function import block_dropout, butterfly_blocks, butterfly_perms, cayley, group_size
from qft.adapters.oft.function import rotate, rotated_linear


@dataclass(frozen=True)
class BOFTConfig(TargetedConfig):
    """BOFT adapters as PEFT defines them (field names and defaults are PEFT's ``BOFTConfig``'s).

    Attributes:
        boft_block_size / boft_block_num: b, or the number of blocks D (exactly one of them non-zero;
            b * D = in_features for every target).
        boft_n_butterfly_factor: m, the butterfly factors; m > 1 needs even b and D and ``b 2^(m-1)``
            dividing in_features. (PEFT without its CUDA extension, e.g. on CPU, silently trains m = 1;
            qft always trains the m asked for.)
        boft_dropout: PEFT's multiplicative dropout: in training, ``int(p * D)`` blocks of one factor
            drawn at random act as the identity.
        init_weights: True: R = 0 and s = 1 (the identity); False: R ~ N(0, 0.1), s ~ N(1, 0.1).
        target_modules: PEFT's name matching.
    """

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    init_weights: bool = True
    target_modules: tuple[str, ...] | str = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ValueError("give exactly one of boft_block_size and boft_block_num (the other 0), as PEFT requires")
        if self.boft_n_butterfly_factor < 1:
            raise ValueError(f"boft_n_butterfly_factor must be at least 1, got {self.boft_n_butterfly_factor}")
        p = self.boft_dropout
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
            raise ValueError(f"boft_dropout must be in [0, 1), got {p!r}")
        if not isinstance(self.init_weights, bool):
            raise TypeError(f"init_weights must be a bool, got {self.init_weights!r}")
        object.__setattr__(self, "target_modules", checked_targets(self.target_modules))

    def blocks_for(self, in_features: int) -> tuple[int, int]:
        """(D, b) for a layer with ``in_features`` inputs; ``ValueError`` (PEFT's conditions) when the
        config does not fit it."""
        m = self.boft_n_butterfly_factor
        size, num = self.boft_block_size, self.boft_block_num
        if in_features % (size or num):
            raise ValueError(f"in_features {in_features} is not divisible by BOFT's block {'size' if size else 'num'}")
        size, num = (size, in_features // size) if size else (in_features // num, num)
        if m > 1 and (size % 2 or num % 2 or num % 2 ** (m - 1)):
            raise ValueError(
                f"BOFT with {m} butterfly factors needs an even block size and block count with 2^{m - 1} "
                f"dividing the count; in_features {in_features} gives {num} blocks of {size}"
            )
        return num, size


class BOFTLinear(nn.Module):
    """``s * base(x M)`` (bias added after the scale), PEFT's BOFT layer; a fresh adapter is the identity.

    Over a quantized base, x M W^T runs as OFT's rotated linear with M's g x g diagonal blocks
    (``qft.adapters.boft.function``); the base output before the scale is kept for s's gradient."""

    def __init__(self, base_layer: nn.Module, config: BOFTConfig) -> None:
        super().__init__()
        attach_base(self, base_layer, config, BOFTConfig)
        blocks, size = config.blocks_for(self.in_features)
        m = config.boft_n_butterfly_factor
        device = base_layer.weight.device
        self.group = group_size(size, m)
        self.register_buffer("boft_perms", butterfly_perms(self.in_features, blocks, size, m).to(device), False)
        self.boft_R = nn.Parameter(torch.zeros(m, blocks, size, size, device=device))
        self.boft_s = nn.Parameter(torch.ones(self.out_features, 1, device=device))
        if not config.init_weights:
            with torch.no_grad():
                self.boft_R.normal_(0.0, 0.1)
                self.boft_s.normal_(1.0, 0.1)
        self.merged = False

    def rotation(self, dropout: bool = True) -> torch.Tensor:
        """M's diagonal blocks [in / g, g, g] in fp32 (differentiable; with ``dropout``, PEFT's block
        dropout is drawn in training)."""
        with torch.autocast(self.boft_R.device.type, enabled=False):  # fp32, also under autocast
            q = cayley(self.boft_R.float())
            if dropout and self.training and self.config.boft_dropout > 0:
                q = block_dropout(q, self.config.boft_dropout)
            return butterfly_blocks(q, self.boft_perms, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in] -> [..., out]`` in x's dtype (the autocast dtype under autocast)."""
        if self.merged:
            return self.base_layer(x)
        base, rot, scale = self.base_layer, self.rotation(), self.boft_s.view(-1)
        qt = quantized_weight(base)
        if qt is not None and base.input_perm is None:  # OFT's path; the bias joins after the scale
            y = rotated_linear(x, qt, rot)
            return (y * scale if base.bias is None else torch.addcmul(base.bias, y, scale)).to(y.dtype)
        # nn.Linear, or an act-order layer (it permutes the rotated input): PEFT's arrangement
        y = base(rotate(x, rot))
        if base.bias is None:
            return (y * scale).to(y.dtype)
        return ((y - base.bias) * scale + base.bias).to(y.dtype)

    def delta_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M [in, in], s [out, 1]) in fp32 without dropout: merging makes the weight ``diag(s) W M^T``."""
        return torch.block_diag(*self.rotation(dropout=False)), self.boft_s.float()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold M and s into the base weight, ``W' = diag(s) W M^T`` (a quantized base is re-quantized:
        lossy)."""
        if not self.merged:
            rotation, scale = self.delta_matrices()
            transform_base_weight(self.base_layer, lambda w: (w @ rotation.t()) * scale)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: ``W = diag(1/s) W' M`` (M is orthogonal)."""
        if self.merged:
            rotation, scale = self.delta_matrices()
            transform_base_weight(self.base_layer, lambda w: (w / scale) @ rotation)
            self.merged = False

    def extra_repr(self) -> str:
        """Factors, blocks and block size, and whether merged."""
        m, blocks, size, _ = self.boft_R.shape
        return f"factors={m}, blocks={blocks}, block_size={size}, merged={self.merged}"
