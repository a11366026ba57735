"""BOFT (butterfly orthogonal finetuning) as PEFT defines it, over quantized or plain linear layers.

PEFT's files: ``adapter_config.json`` with ``peft_type: "BOFT"``, weights under ``<module>.boft_R``
[m, D, b, b] and ``<module>.boft_s`` [out, 1] (bare parameters, no ``.weight``).
"""

from __future__ import annotations

from qft.adapters import AdapterSpec, register, require_default_init
from qft.adapters.boft.function import butterfly_blocks, butterfly_perms, butterfly_product, cayley
from qft.adapters.boft.layer import BOFTConfig, BOFTLinear

__all__ = ["BOFTConfig", "BOFTLinear", "butterfly_blocks", "butterfly_perms", "butterfly_product", "cayley"]

DEMO_FACTORS = 2


def _to_peft(config: BOFTConfig) -> dict:
    return {
        "boft_block_size": config.boft_block_size,
        "boft_block_num": config.boft_block_num,
        "boft_n_butterfly_factor": config.boft_n_butterfly_factor,
        "boft_dropout": config.boft_dropout,
        "init_weights": config.init_weights,
        "fan_in_fan_out": False,
        "bias": "none",
    }


def _from_peft(raw: dict) -> BOFTConfig:
    if raw.get("fan_in_fan_out", False):
        raise ValueError("BOFT adapters with fan_in_fan_out (Conv1D layers) are not supported")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"BOFT adapters with bias {raw['bias']!r} are not supported (only 'none')")
    return BOFTConfig(
        boft_block_size=raw.get("boft_block_size", 4),
        boft_block_num=raw.get("boft_block_num", 0),
        boft_n_butterfly_factor=raw.get("boft_n_butterfly_factor", 1),
        boft_dropout=raw.get("boft_dropout", 0.0),
        init_weights=raw.get("init_weights", True),
        target_modules=raw["target_modules"],
    )


def _demo_config(targets: tuple[str, ...], rank: int, block_size: int, init: str) -> BOFTConfig:
    require_default_init(init, "BOFT")
    return BOFTConfig(boft_block_size=block_size, boft_n_butterfly_factor=DEMO_FACTORS, target_modules=targets)


SPEC = register(
    AdapterSpec(
        name="boft",
        config_type=BOFTConfig,
        layer_type=BOFTLinear,
        parts=("boft_R", "boft_s"),
        peft_type="BOFT",
        to_peft=_to_peft,
        from_peft=_from_peft,
        demo_config=_demo_config,
        demo_lr=2e-4,  # OFT's: R enters Q through the Cayley transform as OFT's parameters do
        demo_report=lambda config: {
            "boft block size": config.boft_block_size,
            "boft butterfly factors": config.boft_n_butterfly_factor,
        },
        bare_parts=True,
    )
)
