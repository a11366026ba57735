"""PEFT's BOFT over qft's QuantLinear, through qft's path.

PEFT has no public hook for BOFT either, so ``enable_boft()`` is an opt-in like ``enable_oft()``: it
replaces PEFT's private ``peft.tuners.boft.model._get_tuner_layer_class`` with a wrapper that returns
``QftBOFTLinear`` for ``QuantLinear`` bases and defers to PEFT for every other layer;
``disable_boft()`` restores PEFT's function.

``QftBOFTLinear`` is PEFT's BOFT layer (its ``boft_R`` / ``boft_s`` parameters, dropout, state dict and
files) with qft's forward and merge: M's g x g diagonal blocks built from Q, x rotated once (OFT's
kernels), the base's quantized matmul, then the scale. It always trains the butterfly factors asked for:
PEFT drops to one factor when its run-time CUDA extension does not build, which qft never needs. The
dense [m, in, in] permutation matrices PEFT keeps per layer are replaced by index vectors.
"""

from __future__ import annotations

import contextlib

import torch
from peft.tuners.boft import layer as boft_layer
from peft.tuners.boft import model as boft_model

from qft.adapters.boft.function import butterfly_blocks, cayley, group_size
from qft.adapters.oft.function import rotate, rotated_linear
from qft.integrations.peft import QftBackend, TunerLayerSwap, _known_layer


@contextlib.contextmanager
def _butterflies_kept():
    """PEFT's ``update_layer`` sets the factors to 1 unless its CUDA extension loads; qft's layer needs
    none, so it is told the extension is there while the layer is made."""
    real = boft_layer.get_fbd_cuda
    boft_layer.get_fbd_cuda = lambda: True
    try:
        yield
    finally:
        boft_layer.get_fbd_cuda = real


class QftBOFTLinear(boft_layer.Linear):
    """PEFT's BOFT layer over a QuantLinear; forward and merge through qft (see the module docstring)."""

    def __init__(self, base_layer, adapter_name: str, config, **kwargs) -> None:
        with _known_layer():
            super().__init__(base_layer, adapter_name, config, **kwargs)
        self.quantization_backend = QftBackend()

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        """PEFT's, with the factors kept; PEFT's dense permutation matrices become index vectors."""
        with _butterflies_kept():
            super().update_layer(adapter_name, config, **kwargs)
        self.fbd_cuda_available = False  # PEFT's block-diagonal paths are never taken here
        if self.boft_P.dim() == 3:  # row j of P_i holds its one at perms[i, j]
            self.register_buffer("boft_perms", self.boft_P.argmax(dim=2), persistent=False)
            self.register_buffer("boft_P", self.boft_P.new_empty(0), persistent=False)

    def _blocks(self, adapter: str, dropout: bool) -> torch.Tensor:
        r = self.boft_R[adapter]
        with torch.autocast(r.device.type, enabled=False):
            q = cayley(r.float())
            if dropout:
                q = self.boft_dropout[adapter](q)
            return butterfly_blocks(q, self.boft_perms, group_size(self.boft_block_size[adapter], r.shape[0]))

    def get_delta_weight(self, adapter) -> tuple[torch.Tensor, torch.Tensor]:
        """(M [in, in], s [out, 1]) in fp32, as PEFT's: merging makes the weight ``diag(s) W M^T``."""
        return torch.block_diag(*self._blocks(adapter, dropout=False)), self.boft_s[adapter].float()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """PEFT's BOFT forward (adapters composed in PEFT's order) through qft's rotation and matmul."""
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.boft_R]
        if self.merged or not active:
            return base(x, *args, **kwargs)
        scale = torch.ones(self.out_features, device=x.device)
        if len(active) == 1 and base.input_perm is None:
            y = rotated_linear(x, base.quantized, self._blocks(active[0], self.training))
        else:  # x @ (M_last ... M_first): the last adapter's rotation first
            for name in reversed(active):
                x = rotate(x, self._blocks(name, self.training))
            y = base(x) if base.bias is None else base(x) - base.bias
        for name in active:
            scale = scale * self.boft_s[name].view(-1)
        y = y * scale if base.bias is None else torch.addcmul(base.bias, y, scale)
        return y.to(x.dtype)


_BOFT_SWAP = TunerLayerSwap(boft_model, QftBOFTLinear)


def enable_boft() -> None:
    """Opt in: PEFT's BOFT wraps QuantLinear layers in ``QftBOFTLinear`` (patches PEFT's private
    ``peft.tuners.boft.model._get_tuner_layer_class``; every other layer type is unchanged)."""
    _BOFT_SWAP.enable()


def disable_boft() -> None:
    """Undo ``enable_boft``."""
    _BOFT_SWAP.disable()
