"""ETHERConfig (what users hold) and ETHERLinear: a frozen base layer between block-wise reflections."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qft import functional
from qft.adapters import (
    TargetedConfig,
    attach_base,
    check_adapter_dtype,
    checked_targets,
    quantized_weight,
    transform_base_weight,
)
from qft.adapters.ether.function import TERMS, block_matrices, reflect, reflect_blocks
from qft.adapters.oft.function import rotate, rotated_linear
from qft.ops.oft import triton_rotates


@dataclass(frozen=True)
class ETHERConfig(TargetedConfig):
    """ETHER / ETHER+ adapters (Bini et al. 2024): ``W' = H_out W H_in`` with block-diagonal reflections.

    Attributes:
        blocks: N, blocks per side; must divide in_features (and out_features with ``output_side``).
        plus: ETHER+ (``H = I - uu^T/|u|^2 + vv^T/|v|^2``, two vectors per block, u = v at the start so
            a fresh adapter is the identity) instead of ETHER (``H = I - 2uu^T/|u|^2``, one vector, a
            reflection from the start: the paper's random init changes the layer's output at once).
        output_side: reflect the output too (``H_out``; the bias is added after it).
        target_modules: PEFT's name matching. adapter_dtype: the vectors' dtype (fp32 by default).
    """

    blocks: int = 32
    plus: bool = False
    output_side: bool = False
    target_modules: tuple[str, ...] | str = field(default_factory=tuple)
    adapter_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1:
            raise ValueError(f"blocks must be a positive int, got {self.blocks!r}")
        for name in ("plus", "output_side"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_adapter_dtype(self.adapter_dtype)
        object.__setattr__(self, "target_modules", checked_targets(self.target_modules))

    @property
    def vectors(self) -> int:
        """Vectors per block: 1 (ETHER) or 2 (ETHER+)."""
        return 2 if self.plus else 1


class _Vectors(nn.Module):
    """Holds ``weight`` [k, N, b] (state-dict key ``<part>.weight``); empty [0] for a side not reflected."""

    def __init__(self, shape, device, dtype) -> None:
        super().__init__()
        weight = torch.randn(shape, device=device, dtype=dtype) if shape[0] else torch.empty(0, device=device)
        if len(shape) == 3 and shape[0] == 2:
            weight[1] = weight[0]  # ETHER+: u = v, the identity
        self.weight = nn.Parameter(weight.to(dtype))


class ETHERLinear(nn.Module):
    """``H_out`` applied to ``base_layer`` over ``H_in x`` (bias after ``H_out``), block by block."""

    def __init__(self, base_layer: nn.Module, config: ETHERConfig) -> None:
        super().__init__()
        attach_base(self, base_layer, config, ETHERConfig)
        n = config.blocks
        sides = (("in_features", base_layer.in_features),)
        if config.output_side:
            sides += (("out_features", base_layer.out_features),)
        for name, size in sides:
            if size % n:
                raise ValueError(f"ETHER blocks {n} do not divide {name} {size}")
        device, k = base_layer.weight.device, config.vectors
        self.ether_in = _Vectors((k, n, self.in_features // n), device, config.adapter_dtype)
        out_shape = (k, n, self.out_features // n) if config.output_side else (0,)
        self.ether_out = _Vectors(out_shape, device, config.adapter_dtype)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in] -> [..., out]`` in x's dtype."""
        if self.merged:
            return self.base_layer(x)
        base, vectors = self.base_layer, self.ether_in.weight
        qt = quantized_weight(base)
        if not self.config.output_side:
            if qt is not None and base.input_perm is None and triton_rotates(x, vectors.shape[2]):
                return rotated_linear(x, qt, block_matrices(vectors), base.bias)  # OFT's path, fused
            return base(_reflect_side(x, vectors))
        x = _reflect_side(x, vectors)
        y = functional.quant_linear(base.permute_input(x), qt) if qt is not None else x @ base.weight.t()
        y = _reflect_side(y, self.ether_out.weight)
        return y if base.bias is None else y + base.bias.to(y.dtype)

    def _matrix(self, vectors: torch.Tensor) -> torch.Tensor:
        """The block-diagonal H of one side, dense fp32."""
        _, n, b = vectors.shape
        eye = torch.eye(n * b, device=vectors.device)
        return reflect(eye, vectors).t()  # rows of I reflected: H^T = H

    def _side_matrices(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        h_in = self._matrix(self.ether_in.weight)
        h_out = self._matrix(self.ether_out.weight) if self.config.output_side else None
        return h_in, h_out

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the reflections into the base weight, ``W' = H_out W H_in`` (a quantized base is re-quantized)."""
        if not self.merged:
            h_in, h_out = self._side_matrices()
            transform_base_weight(self.base_layer, lambda w: (w if h_out is None else h_out @ w) @ h_in)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` with the inverses (ETHER's reflections are their own)."""
        if self.merged:
            h_in, h_out = (None if h is None else torch.linalg.inv(h) for h in self._side_matrices())
            transform_base_weight(self.base_layer, lambda w: (w if h_out is None else h_out @ w) @ h_in)
            self.merged = False

    def extra_repr(self) -> str:
        """Variant, blocks, sides and whether merged."""
        c = self.config
        kind = "ETHER+" if c.plus else "ETHER"
        return f"{kind}, blocks={c.blocks}, output_side={c.output_side}, merged={self.merged}, terms={TERMS[c.vectors]}"


def _reflect_side(t: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``t`` reflected block by block: as OFT's block rotation by the reflections' matrices where the
    Triton rotation kernel takes the block (one pass over t, one fused backward), else through the
    vectors (O(M d) per vector, in torch)."""
    if triton_rotates(t, vectors.shape[2]):
        return rotate(t, block_matrices(vectors))
    return reflect_blocks(t, vectors)
