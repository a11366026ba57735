"""OFT (Qiu et al. 2023) as PEFT >= 0.18 defines it, over quantized or plain linear layers.

PEFT's files: ``adapter_config.json`` with ``peft_type: "OFT"`` (given by ``oft_block_size``),
weights under ``<module>.oft_R.weight``.
"""

from __future__ import annotations

from qft.adapters import AdapterSpec, register, require_default_init
from qft.adapters.oft.function import coft_project, oft_linear, oft_rotation, rotate, rotated_linear
from qft.adapters.oft.layer import OFTConfig, OFTLinear

__all__ = ["OFTConfig", "OFTLinear", "coft_project", "oft_linear", "oft_rotation", "rotate", "rotated_linear"]


def _to_peft(config: OFTConfig) -> dict:
    return {
        "r": 0,
        "oft_block_size": config.block_size,
        "module_dropout": 0.0,
        "init_weights": True,
        "coft": config.coft,
        "eps": config.eps,
        "block_share": config.block_share,
        "use_cayley_neumann": config.use_cayley_neumann,
        "num_cayley_neumann_terms": config.cayley_neumann_terms,
        "fan_in_fan_out": False,
    }


def _from_peft(raw: dict) -> OFTConfig:
    if not raw.get("oft_block_size"):
        raise ValueError("OFT adapters given by r instead of oft_block_size are not supported")
    return OFTConfig(
        block_size=raw["oft_block_size"],
        cayley_neumann_terms=raw.get("num_cayley_neumann_terms", 5),
        use_cayley_neumann=raw.get("use_cayley_neumann", True),
        block_share=raw.get("block_share", False),
        coft=raw.get("coft", False),
        eps=raw.get("eps", 6e-5),
        target_modules=raw["target_modules"],
    )


def _demo_config(targets: tuple[str, ...], rank: int, block_size: int, init: str) -> OFTConfig:
    require_default_init(init, "OFT")
    return OFTConfig(block_size=block_size, target_modules=targets)


SPEC = register(
    AdapterSpec(
        name="oft",
        config_type=OFTConfig,
        layer_type=OFTLinear,
        parts=("oft_R",),
        peft_type="OFT",
        to_peft=_to_peft,
        from_peft=_from_peft,
        demo_config=_demo_config,
        # OFT's parameters enter R through Q, so Adam steps of LoRA's size rotate too far (measured on
        # the demo: 30 steps at 2e-3 lower the held-out cosine, at 2e-4 raise it).
        demo_lr=2e-4,
        demo_report=lambda config: {"oft block size": config.block_size},
    )
)
