"""``fuse_projections``: the opt-in model pass that runs LoRA layers sharing an input as one.

Attention's q/k/v and the MLP's gate/up read the same x. Grouped, their quantized weights decode into
one scratch buffer and run as one GEMM each way on a GPU backend (``qft.adapters.lora.group``,
``qft.ops.stack``), with one set of LoRA terms over K + the summed ranks. Nothing about the model's
parameters changes: the state-dict keys, ``save_adapters`` files and PEFT files stay as they were, and
``unfuse_projections`` takes the groups out again. Whether it pays is for a GPU to measure
(``benchmarks/bench_e2e.py``'s ``qft-fused`` provider); it stays opt-in until then.
"""

from __future__ import annotations

from torch import nn

from qft.adapters import quantized_weight
from qft.adapters.lora import LoRALinear
from qft.adapters.lora.group import ProjectionGroup

# Sibling modules that read the same x in Llama-style models (transformers' names).
DEFAULT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_projections(model: nn.Module, groups=DEFAULT_GROUPS) -> list[ProjectionGroup]:
    """Group, in place, each set of sibling LoRA layers named in ``groups`` that can run as one: all
    ``LoRALinear`` over a quantized base without act-order permutation, trainable bias or FSDP storage
    (``prepare_fsdp``/``shard_model`` make each layer its own unit), unmerged, with the same
    in_features, device, adapter dtype and dropout. Returns the groups made (a set that does not
    qualify is left as it is)."""
    made = []
    for parent in model.modules():
        for names in groups:
            members = [getattr(parent, name, None) for name in names]
            if _qualify(members):
                group = ProjectionGroup(members)
                for member in members:
                    member.projection_group = group
                made.append(group)
    return made


def unfuse_projections(model: nn.Module) -> int:
    """Take every group out of ``model``; returns how many layers were grouped."""
    count = 0
    for module in model.modules():
        if module.__dict__.pop("projection_group", None) is not None:
            count += 1
    return count


def _qualify(members: list) -> bool:
    if not all(isinstance(m, LoRALinear) and _alone_ok(m) for m in members):
        return False
    first = members[0]
    same = ("in_features", "config.dropout", "lora_A.weight.dtype", "lora_A.weight.device")
    return all(_get(m, path) == _get(first, path) for m in members for path in same)


def _alone_ok(layer: LoRALinear) -> bool:
    base = layer.base_layer
    if quantized_weight(base) is None or layer.merged or "projection_group" in layer.__dict__:
        return False
    if layer.lora_iec is not None:  # IEC's connections make its own factors: it runs alone
        return False
    no_perm = getattr(base, "input_perm", None) is None
    # FSDP-prepared (flat, shardable storage): each layer is its own FSDP unit, so a sibling's weight
    # may still be sharded while the first member runs
    sharded = getattr(base, "_flat_layout", None) is not None
    return no_perm and not sharded and (base.bias is None or not base.bias.requires_grad)


def _get(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj
