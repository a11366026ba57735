"""IR-QLoRA's information elastic connections (LoRAConfig(iec=True)): the layer against the paper's
reshape-and-mean formula written here, its gradients, its files, merge, and where it may not run."""

from __future__ import annotations

import json

import pytest
import torch

import qft


def _model(seed=0, quantized=True):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 32))
    if quantized:
        qft.quantize_(model, qft.QuantConfig("nf4", 64))
    return model


def _paper_lora(x, a, b, alpha_a, alpha_b, scaling):
    """IR-QLoRA's IEC as its reshapes: A x plus alpha_a times the mean of each of r input groups, then
    B of that plus alpha_b times each of its r values repeated over a group of out / r outputs."""
    r = a.shape[0]
    h = x @ a.t() + alpha_a * x.reshape(*x.shape[:-1], r, -1).mean(-1)
    out = (h @ b.t()).reshape(*h.shape, -1) + alpha_b * h.unsqueeze(-1)
    return scaling * out.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("quantized", [True, False])
def test_the_layer_is_the_papers_formula_and_trains_its_two_scalars(quantized):
    model = _model(quantized=quantized)
    qft.add_adapters(model, qft.LoRAConfig(r=8, alpha=16, target_modules=("0", "2"), iec=True))
    layer = model[0]
    x = torch.randn(5, 64)
    assert torch.equal(model[0](x), model[0].base_layer(x))  # zero B and zero scalars: unchanged at start
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
        layer.lora_iec.copy_(torch.tensor([0.7, -0.4]))
    got = layer(x)
    a, b, (alpha_a, alpha_b) = layer.lora_A.weight, layer.lora_B.weight, layer.lora_iec
    want = layer.base_layer(x) + _paper_lora(x, a, b, alpha_a, alpha_b, layer.scaling)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    grad = layer.lora_iec.grad.clone()
    layer.lora_iec.grad = None
    want.square().sum().backward()
    torch.testing.assert_close(grad, layer.lora_iec.grad, rtol=1e-4, atol=1e-6)
    assert grad.abs().min() > 0
    assert layer.lora_iec.requires_grad and not layer.base_layer.bias.requires_grad


def test_files_round_trip_and_plain_lora_files_stay_peft_s(tmp_path):
    model = _model()
    qft.add_adapters(model, qft.LoRAConfig(r=8, target_modules=("0", "2"), iec=True))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.weight.normal_(0, 0.1)
            layer.lora_iec.normal_()
    qft.save_adapters(model, tmp_path / "iec")
    assert json.loads((tmp_path / "iec" / "adapter_config.json").read_text())["iec"] is True
    fresh = _model()
    qft.load_adapters(fresh, tmp_path / "iec")
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))
    assert torch.equal(fresh[0].lora_iec, model[0].lora_iec)
    plain = _model()
    qft.add_adapters(plain, qft.LoRAConfig(r=8, target_modules=("0", "2")))
    with pytest.raises(ValueError, match="unexpected"):
        qft.load_adapters(plain, tmp_path / "iec")
    qft.save_adapters(plain, tmp_path / "plain")
    assert "iec" not in json.loads((tmp_path / "plain" / "adapter_config.json").read_text())


def test_merge_adds_the_connections_too():
    model = _model(quantized=False)
    qft.add_adapters(model, qft.LoRAConfig(r=4, target_modules=("0",), iec=True))
    with torch.no_grad():
        model[0].lora_B.weight.normal_(0, 0.1)
        model[0].lora_iec.copy_(torch.tensor([0.5, 0.3]))
    x = torch.randn(4, 64)
    before = model(x)
    qft.merge_adapters(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_iec_needs_r_to_divide_both_feature_counts_and_runs_alone():
    with pytest.raises(ValueError, match="iec needs r=5 to divide 0's 64 inputs"):
        qft.add_adapters(_model(), qft.LoRAConfig(r=5, target_modules=("0",), iec=True))
    with pytest.raises(TypeError, match="iec must be a bool"):
        qft.LoRAConfig(r=4, target_modules=("0",), iec=1)
    parent = torch.nn.Module()
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(parent, name, torch.nn.Linear(64, 64))
    qft.quantize_(parent, qft.QuantConfig("nf4", 64))
    qft.add_adapters(parent, qft.LoRAConfig(r=8, target_modules=("q_proj", "k_proj", "v_proj"), iec=True))
    assert qft.nn.fuse_projections(parent) == []
