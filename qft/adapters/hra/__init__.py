"""HRA (Householder reflection adaptation) as PEFT defines it, over quantized or plain linear layers.

PEFT's files: ``adapter_config.json`` with ``peft_type: "HRA"``, weights under ``<module>.hra_u`` (a
bare parameter, no ``.weight``).
"""

from __future__ import annotations

from qft.adapters import AdapterSpec, register, require_default_init
from qft.adapters.hra.function import householder
from qft.adapters.hra.layer import HRAConfig, HRALinear

__all__ = ["HRAConfig", "HRALinear", "householder"]


def _to_peft(config: HRAConfig) -> dict:
    return {"r": config.r, "apply_GS": config.apply_GS, "init_weights": config.init_weights}


def _from_peft(raw: dict) -> HRAConfig:
    return HRAConfig(
        r=raw.get("r", 8),
        apply_GS=raw.get("apply_GS", False),
        init_weights=raw.get("init_weights", True),
        target_modules=raw["target_modules"],
    )


def _demo_config(targets: tuple[str, ...], rank: int, block_size: int, init: str) -> HRAConfig:
    require_default_init(init, "HRA")
    return HRAConfig(r=rank, target_modules=targets)  # --rank sets the reflections


SPEC = register(
    AdapterSpec(
        name="hra",
        config_type=HRAConfig,
        layer_type=HRALinear,
        parts=("hra_u",),
        peft_type="HRA",
        to_peft=_to_peft,
        from_peft=_from_peft,
        demo_config=_demo_config,
        demo_lr=2e-3,
        demo_report=lambda config: {"hra reflections": config.r},
        bare_parts=True,
    )
)
