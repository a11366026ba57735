"""DiaBlo (Sun et al. 2025: train only the diagonal blocks of W) over quantized or plain linear layers.

Not a PEFT method: qft's files keep PEFT's layout (``adapter_config.json`` with ``peft_type:
"DIABLO"``, weights under ``<module>.diablo_D.weight``), which qft reads back and PEFT does not.
"""

from __future__ import annotations

import torch

from qft.adapters import AdapterSpec, register
from qft.adapters.diablo.function import diablo_delta, diablo_linear
from qft.adapters.diablo.layer import DiaBloConfig, DiaBloLinear

__all__ = ["DiaBloConfig", "DiaBloLinear", "diablo_delta", "diablo_linear"]


def _to_peft(config: DiaBloConfig) -> dict:
    return {"blocks": config.blocks, "adapter_dtype": str(config.adapter_dtype).removeprefix("torch.")}


def _from_peft(raw: dict) -> DiaBloConfig:
    dtype = getattr(torch, raw.get("adapter_dtype", "float32"), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"adapter_dtype {raw.get('adapter_dtype')!r} is not a torch dtype")
    return DiaBloConfig(blocks=raw["blocks"], target_modules=raw["target_modules"], adapter_dtype=dtype)


def _build(base, config: DiaBloConfig, name: str, quantize) -> DiaBloLinear:
    return DiaBloLinear(base, config)


def _demo_config(targets: tuple[str, ...], rank: int, block_size: int, init: str) -> DiaBloConfig:
    if init != "default":
        raise ValueError(f"--init {init} does not apply to DiaBlo adapters")
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
        build=_build,
        demo_config=_demo_config,
        demo_lr=2e-4,
        demo_report=lambda config: {"diablo blocks": config.blocks},
    )
)
