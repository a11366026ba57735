"""DiaBlo (Sun et al. 2025: train only the diagonal blocks of W) over quantized or plain linear layers.

Not a PEFT method: qft's files keep PEFT's layout (``adapter_config.json`` with ``peft_type:
"DIABLO"``, weights under ``<module>.diablo_D.weight``), which qft reads back and PEFT does not.
"""

from __future__ import annotations

from qft.adapters import AdapterSpec, dtype_name, dtype_named, register, require_default_init
from qft.adapters.diablo.function import diablo_linear
from qft.adapters.diablo.layer import DiaBloConfig, DiaBloLinear

__all__ = ["DiaBloConfig", "DiaBloLinear", "diablo_linear"]


def _to_peft(config: DiaBloConfig) -> dict:
    return {"blocks": config.blocks, "adapter_dtype": dtype_name(config.adapter_dtype)}


def _from_peft(raw: dict) -> DiaBloConfig:
    return DiaBloConfig(blocks=raw["blocks"], target_modules=raw["target_modules"], adapter_dtype=dtype_named(raw))


def _demo_config(targets: tuple[str, ...], rank: int, block_size: int, init: str) -> DiaBloConfig:
    require_default_init(init, "DiaBlo")
    return DiaBloConfig(blocks=rank, target_modules=targets)  # --rank sets the block count


SPEC = register(
    AdapterSpec(
        name="diablo",
        config_type=DiaBloConfig,
        layer_type=DiaBloLinear,
        parts=("diablo_D",),
        peft_type="DIABLO",
        to_peft=_to_peft,
        from_peft=_from_peft,
        demo_config=_demo_config,
        demo_lr=2e-4,
        demo_report=lambda config: {"diablo blocks": config.blocks},
    )
)
