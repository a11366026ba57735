"""The adapter registry: LoRA and OFT are found by config, layer and PEFT type; a new kind plugs in
through its spec alone, and add/merge/unmerge and adapter_layers find it with no edit elsewhere."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import qft
from qft import adapters


def test_lora_and_oft_are_found_every_way():
    assert {s.name for s in adapters.specs()} >= {"lora", "oft"}
    lora, oft = adapters.spec_named("lora"), adapters.spec_named("oft")
    assert adapters.spec_for_config(qft.LoRAConfig(target_modules=["0"])) is lora
    assert adapters.spec_for_config(qft.OFTConfig(block_size=8, target_modules=["0"])) is oft
    assert adapters.spec_for_peft_type("LORA") is lora and adapters.spec_for_peft_type("OFT") is oft
    model = qft.add_adapters(nn.Sequential(nn.Linear(16, 8)), qft.LoRAConfig(r=2, target_modules=["0"]))
    assert adapters.spec_for_layer(model[0]) is lora


def test_a_clashing_spec_is_refused_and_nothing_changes():
    before = adapters.specs()
    lora = adapters.spec_named("lora")
    with pytest.raises(ValueError, match="has the config_type of adapter 'lora'"):
        adapters.register(_toy_spec(name="other", config_type=lora.config_type))
    assert adapters.specs() == before


@dataclass(frozen=True)
class _ScaleConfig:
    target_modules: tuple[str, ...] = ()

    def matches(self, name: str) -> bool:
        return adapters.target_matches(self.target_modules, name)


class _ScaleLayer(nn.Module):
    """y = base(x) * (1 + s): a trainable output scale, enough to exercise the verbs."""

    def __init__(self, base: nn.Module, config: _ScaleConfig) -> None:
        super().__init__()
        self.base_layer, self.config = base, config
        out = base.out_features
        self.scale = nn.Linear(1, out, bias=False)
        nn.init.zeros_(self.scale.weight)
        self.merged = False

    def forward(self, x):
        y = self.base_layer(x)
        return y if self.merged else y * (1 + self.scale.weight[:, 0])

    def merge(self):
        self.merged = True

    def unmerge(self):
        self.merged = False


def _toy_spec(**changes):
    fields = dict(
        name="toy-scale",
        config_type=_ScaleConfig,
        layer_type=_ScaleLayer,
        parts=("scale",),
        peft_type="TOY_SCALE",
        to_peft=lambda config: {},
        from_peft=lambda raw: _ScaleConfig(),
        build=lambda base, config, name, quantize: _ScaleLayer(base, config),
        demo_config=lambda *args: _ScaleConfig(),
        demo_lr=1e-3,
    )
    return adapters.AdapterSpec(**{**fields, **changes})


def test_a_new_adapter_plugs_in_through_its_spec_alone(monkeypatch):
    monkeypatch.setattr(adapters, "_SPECS", dict(adapters._SPECS))  # registered for this test only
    spec = adapters.register(_toy_spec())
    model = qft.quantize_(nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)))
    x = torch.randn(3, 32)
    before = model(x)
    qft.add_adapters(model, _ScaleConfig(target_modules=("2",)))
    assert isinstance(model[2], _ScaleLayer) and adapters.spec_for_layer(model[2]) is spec
    assert set(qft.nn.adapter_layers(model)) == {"2"} and set(qft.nn.adapter_layers(model, "toy-scale")) == {"2"}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["2.scale.weight"]
    torch.testing.assert_close(model(x), before)  # zero-initialised scale: the base output
    with torch.no_grad():
        model[2].scale.weight.fill_(1.0)
    torch.testing.assert_close(model(x), 2 * before)
    qft.merge_adapters(model)
    assert model[2].merged
    qft.unmerge_adapters(model)
    assert not model[2].merged
