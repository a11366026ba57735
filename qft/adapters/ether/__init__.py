"""ETHER / ETHER+ (Bini et al. 2024: block-wise hyperplane reflections of W's input and output sides)
over quantized or plain linear layers.

Not a PEFT method: qft's files keep PEFT's layout (``adapter_config.json`` with ``peft_type:
"ETHER"``, weights under ``<module>.ether_in.weight`` / ``ether_out.weight``), which qft reads back.
"""

from __future__ import annotations

from qft.adapters import AdapterSpec, dtype_name, dtype_named, register, require_default_init
from qft.adapters.ether.function import reflect, reflect_blocks
from qft.adapters.ether.layer import ETHERConfig, ETHERLinear

__all__ = ["ETHERConfig", "ETHERLinear", "reflect", "reflect_blocks"]


def _to_peft(config: ETHERConfig) -> dict:
    dtype = dtype_name(config.adapter_dtype)
    return {"blocks": config.blocks, "plus": config.plus, "output_side": config.output_side, "adapter_dtype": dtype}


def _from_peft(raw: dict) -> ETHERConfig:
    return ETHERConfig(
        blocks=raw["blocks"],
        plus=raw.get("plus", False),
        output_side=raw.get("output_side", False),
        target_modules=raw["target_modules"],
        adapter_dtype=dtype_named(raw),
    )


def _demo_config(targets: tuple[str, ...], rank: int, block_size: int, init: str) -> ETHERConfig:
    require_default_init(init, "ETHER")
    # ETHER+ on both sides: the identity at the start, as the demo's before/after comparison wants
    return ETHERConfig(blocks=rank, plus=True, output_side=True, target_modules=targets)


SPEC = register(
    AdapterSpec(
        name="ether",
        config_type=ETHERConfig,
        layer_type=ETHERLinear,
        parts=("ether_in", "ether_out"),
        peft_type="ETHER",
        to_peft=_to_peft,
        from_peft=_from_peft,
        demo_config=_demo_config,
        demo_lr=2e-3,
        demo_report=lambda config: {"ether blocks": config.blocks, "ether+": config.plus},
    )
)
