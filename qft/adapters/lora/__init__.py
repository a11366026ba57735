"""LoRA (Hu et al. 2021) as PEFT defines it, over quantized or plain linear layers.

PEFT's files: ``adapter_config.json`` with ``peft_type: "LORA"``, weights under
``<module>.lora_A.weight`` / ``<module>.lora_B.weight``.
"""

from __future__ import annotations

from qft.adapters import AdapterSpec, QuantizeWith, register
from qft.adapters.lora.function import lora_linear, lora_over
from qft.adapters.lora.layer import LoRAConfig, LoRALinear

__all__ = ["LoRAConfig", "LoRALinear", "lora_linear", "lora_over"]


def _to_peft(config: LoRAConfig) -> dict:
    return {
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        **({"iec": True} if config.iec else {}),  # qft's key (PEFT has no IEC); plain LoRA files stay PEFT's
    }


def _from_peft(raw: dict) -> LoRAConfig:
    return LoRAConfig(
        r=raw["r"],
        alpha=raw.get("lora_alpha", raw["r"]),
        dropout=raw.get("lora_dropout", 0.0),
        target_modules=raw["target_modules"],
        use_rslora=raw.get("use_rslora", False),
        rank_pattern=raw.get("rank_pattern") or {},
        alpha_pattern=raw.get("alpha_pattern") or {},
        iec=raw.get("iec", False),
    )


def _build(base, config: LoRAConfig, name: str, quantize: QuantizeWith | None) -> LoRALinear:
    if quantize is not None:
        return LoRALinear.with_quantizing_init(base, config, quantize, name)
    return LoRALinear(base, config, name)


def _demo_config(targets: tuple[str, ...], rank: int, block_size: int, init: str) -> LoRAConfig:
    return LoRAConfig(r=rank, alpha=2 * rank, target_modules=targets, init=init)


SPEC = register(
    AdapterSpec(
        name="lora",
        config_type=LoRAConfig,
        layer_type=LoRALinear,
        parts=("lora_A", "lora_B"),
        optional_parts=("lora_iec",),
        peft_type="LORA",
        to_peft=_to_peft,
        from_peft=_from_peft,
        build=_build,
        demo_config=_demo_config,
        demo_lr=2e-3,
        quantizing_init=lambda config: None if config.init == "default" else f"init={config.init!r}",
    )
)
