"""Probes of a hostile but realistic user: failed loads and merges leave the model bit-identical,
malformed files and configs fail with a message naming what is wrong."""

import json

import pytest
import torch
from torch import nn

import qft


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 64))
    return qft.quantize_(model)


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "types": [type(m).__name__ for m in model.modules()],
    }


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


@pytest.fixture
def saved(tmp_path):
    source = _model()
    qft.add_adapters(source, qft.LoRAConfig(r=4, target_modules=("0", "2")))
    for name, p in source.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p)
    qft.save_adapters(source, tmp_path / "good")
    return source, tmp_path


@pytest.mark.parametrize("damage", ["shapes", "keys", "config", "json"])
def test_failed_load_into_a_model_without_adapters_leaves_it_unchanged(saved, damage):
    source, tmp = saved
    bad = tmp / "bad"
    bad.mkdir()
    config = json.loads((tmp / "good" / "adapter_config.json").read_text())
    tensors = qft.nn.adapters_io.load_file(str(tmp / "good" / "adapter_model.safetensors"))
    match = "adapter has shape"
    if damage == "shapes":
        config["r"] = 8  # the weights say r = 4
    elif damage == "keys":
        tensors = {k.replace(".2.", ".5."): v for k, v in tensors.items()}
        match = "does not fit this model"
    elif damage == "config":
        del config["r"]
        match = "not a usable PEFT adapter config: missing 'r'"
    (bad / "adapter_config.json").write_text("{not json" if damage == "json" else json.dumps(config))
    if damage == "json":
        match = "not a usable PEFT adapter config"
    qft.nn.adapters_io.save_file(tensors, str(bad / "adapter_model.safetensors"))
    model = _model()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        qft.load_adapters(model, bad)
    _assert_unchanged(model, before)
    qft.load_adapters(model, tmp / "good")  # the right file still loads afterwards
    x = torch.randn(3, 64)
    torch.testing.assert_close(model(x), source(x))
