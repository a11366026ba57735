"""LoRA layers over quantized weights that read the same x (q/k/v, gate/up), run as one.

A ``ProjectionGroup`` is shared by its members (plain attributes: no module, no state-dict key). The
first member called with an x computes every member's output in one pass (``qft.ops.stack``: on a GPU
backend one decode + GEMM over K + the summed ranks each way) and keeps the others' outputs until
they are asked for with that same x; anything else (another x, x changed in place, a merged member,
autocast) runs the member alone. ``qft.nn.fuse_projections`` installs groups.
"""

from __future__ import annotations

import torch

from qft.ops import lora_terms, stack


class _StackedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weights, biases, scalings, dropout, *adapters):
        lora_As, lora_Bs = adapters[0::2], adapters[1::2]
        masks, xas = [], []
        for a in lora_As:  # each member its own dropout mask, as separate layers draw them
            mask = None
            x_lora = x2d
            if dropout > 0:
                mask = torch.empty(x2d.shape, dtype=torch.bool, device=x2d.device).bernoulli_(1 - dropout)
                x_lora = x2d * mask / (1 - dropout)
            masks.append(mask)
            xas.append(lora_terms.adapter_input(x_lora, a))
        y = stack.lora_forward(x2d, weights, biases, xas, lora_Bs, scalings)
        needs_a = any(ctx.needs_input_grad[5::2])
        ctx.save_for_backward(x2d if needs_a else None, *lora_As, *lora_Bs, *xas)
        ctx.masks, ctx.weights, ctx.scalings, ctx.dropout = masks, weights, scalings, dropout
        return y

    @staticmethod
    def backward(ctx, grad):
        x2d, *saved = ctx.saved_tensors
        count = len(ctx.weights)
        lora_As, lora_Bs, xas = saved[:count], saved[count : 2 * count], saved[2 * count :]
        x_loras = []
        for i, mask in enumerate(ctx.masks):
            needs = ctx.needs_input_grad[5 + 2 * i]
            x_loras.append(None if not needs else x2d if mask is None else x2d * mask / (1 - ctx.dropout))
        needs_x = ctx.needs_input_grad[0]
        dropout_scale = 1.0 / (1.0 - ctx.dropout)
        args = (ctx.weights, x_loras, xas, lora_As, lora_Bs, ctx.scalings, ctx.masks, dropout_scale, needs_x)
        grad_x, grads_a, grads_b = stack.lora_backward(grad.contiguous(), *args)
        adapter_grads = []
        for i in range(count):
            adapter_grads.append(grads_a[i] if ctx.needs_input_grad[5 + 2 * i] else None)
            adapter_grads.append(grads_b[i] if ctx.needs_input_grad[6 + 2 * i] else None)
        return (grad_x if needs_x else None), None, None, None, None, *adapter_grads


class ProjectionGroup:
    """LoRALinear layers over QuantLinear bases with one input (same in_features, adapter dtype and
    dropout, no act-order permutation), computed together."""

    def __init__(self, members: list) -> None:
        self.members = list(members)
        self._key = None
        self._outputs: dict[int, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        # copies and pickles carry the members, never a pass's outputs waiting to be served
        return {"members": self.members, "_key": None, "_outputs": {}}

    def __call__(self, member, x: torch.Tensor) -> torch.Tensor:
        """``member``'s output for ``x``: from the pass that computed every member's, or alone."""
        alone = member.merged or torch.is_autocast_enabled(x.device.type) or any(m.merged for m in self.members)
        if alone:
            return member.forward_alone(x)
        key = (id(x), x._version, member.training, torch.is_grad_enabled())
        index = next(i for i, m in enumerate(self.members) if m is member)
        if key != self._key or index not in self._outputs:
            self._outputs = dict(enumerate(self._all_outputs(x)))
            self._key = key
        out = self._outputs.pop(index)
        if not self._outputs:
            self._key = None  # every member served: drop the last reference to x
        return out

    def _all_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        first = self.members[0]
        dropout = first.config.dropout if first.training else 0.0
        x2d = x.reshape(-1, first.in_features)
        adapters = [t for m in self.members for t in (m.lora_A.weight, m.lora_B.weight)]
        weights = [m.base_layer.quantized.weight for m in self.members]
        biases = [m.base_layer.bias for m in self.members]
        scalings = [float(m.scaling) for m in self.members]
        y = _StackedLoRA.apply(x2d, weights, biases, scalings, float(dropout), *adapters)
        sizes = [m.out_features for m in self.members]
        return [part.view(*x.shape[:-1], n) for part, n in zip(y.split(sizes, dim=1), sizes, strict=True)]
