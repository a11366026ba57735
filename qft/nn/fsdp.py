"""QLoRA / QOFT under PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

Choice: each ``QuantLinear`` keeps all parts of its weight (codes, scales, nested scales, zeros) in
one frozen uint8 parameter (``QuantLinear.to_flat_storage``). FSDP2 shards that parameter along its
only dimension and all-gathers it before the layer runs, like any other parameter; the parts are then
views into the gathered bytes. Why not a float ``quant_storage`` (bitsandbytes' answer for FSDP1's
one-dtype flat parameter): FSDP2 all-gathers parameters of mixed dtypes as bytes, so none is needed.
Why not a tensor subclass with FSDP2's all-gather hooks: a flat byte parameter needs no aten op
coverage and keeps every kernel on plain tensors. Blocks need not stay whole on a rank, since no rank
computes on its shard alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from qft import adapters
from qft.nn.quant_linear import QuantLinear


def prepare_fsdp(model: nn.Module) -> nn.Module:
    """Give every QuantLinear of ``model`` its flat, shardable storage (in place); returns ``model``.
    Call before ``fully_shard``; adapters must already be added."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.to_flat_storage()
    return model


def _is_adapter_layer(module: nn.Module) -> bool:
    # PEFT's layers (qft.integrations.peft) wrap the QuantLinear as ``base_layer``, as qft's do.
    return adapters.spec_for_layer(module) is not None or isinstance(getattr(module, "base_layer", None), QuantLinear)


def shard_model(model: nn.Module, mesh=None, **fully_shard_kwargs) -> nn.Module:
    """``prepare_fsdp`` then FSDP2: each adapter layer (qft's, or PEFT's over a QuantLinear) or else
    each bare QuantLinear is its own unit, so one layer's weight is gathered at a time, and the root
    unit holds the rest (embeddings, norms, head).
    ``fully_shard_kwargs`` (``reshard_after_forward``, ``mp_policy``, ...) go to every call."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 keeps FSDP2 here
        from torch.distributed._composable.fsdp import fully_shard

    prepare_fsdp(model)
    units = [m for m in model.modules() if _is_adapter_layer(m)]
    inside = {id(m.base_layer) for m in units}
    units += [m for m in model.modules() if isinstance(m, QuantLinear) and id(m) not in inside]
    with frozen_integer_parameters():
        for unit in units:  # disjoint subtrees: the order among them does not matter, all before the root
            fully_shard(unit, mesh=mesh, **fully_shard_kwargs)
        fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    return model


@contextlib.contextmanager
def frozen_integer_parameters() -> Iterator[None]:
    """Inside the block, ``nn.Parameter(t)`` of an integer tensor is created frozen instead of failing.

    FSDP2 in torch before the fix of pytorch issue 177844 (2.11 among them; seen on the GPU machine)
    wraps each sharded parameter as ``nn.Parameter(dtensor)`` and sets ``requires_grad`` after, so the
    uint8 flat storage raised "only Tensors of floating point dtype can require gradients" in
    ``fully_shard``. Fixed versions pass ``requires_grad`` themselves, and are unaffected.
    """
    saved = nn.Parameter.__dict__["__new__"]
    make = saved.__func__ if isinstance(saved, staticmethod) else saved

    def new(cls, data=None, requires_grad=True):
        if requires_grad and isinstance(data, torch.Tensor) and not (data.is_floating_point() or data.is_complex()):
            requires_grad = False
        return make(cls, data, requires_grad)

    nn.Parameter.__new__ = staticmethod(new)
    try:
        yield
    finally:
        nn.Parameter.__new__ = saved


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of quantized weights held by this rank, bytes of the whole quantized weights)."""
    local = total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            storage = module.weight_storage if module._flat_layout is not None else None
            if storage is None:
                size = module.quantized.nbytes
                local, total = local + size, total + size
                continue
            shard = storage.to_local() if hasattr(storage, "to_local") else storage
            local += shard.numel() * shard.element_size()
            total += storage.numel() * storage.element_size()
    return local, total
