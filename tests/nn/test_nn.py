"""qft.nn: QuantLinear, LoRALinear and the model verbs (quantize_, add_adapters, merge, save/load)."""

import contextlib
import math

import pytest
import torch
from torch import nn

import qft
from qft.nn import LoRALinear, QuantLinear


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96, dtype=dtype), nn.GELU(), nn.Linear(96, 32, dtype=dtype))


def test_quant_linear_is_a_drop_in_linear():
    dense = nn.Linear(64, 32)
    layer = QuantLinear.from_linear(dense, qft.QuantConfig("fp4", 128, double_quant=False))
    assert (layer.in_features, layer.out_features, layer.format, layer.block_size) == (64, 32, "fp4", 128)
    x = torch.randn(2, 3, 64)
    want = nn.functional.linear(x, layer.dequantize(), dense.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())
    assert "format=fp4" in repr(layer)


def test_quantized_weight_is_kept_while_its_buffers_are_the_modules_own():
    layer = QuantLinear.from_linear(nn.Linear(64, 32))
    first = layer.quantized
    assert layer.quantized is first  # no new check per forward
    layer.load_state_dict(layer.state_dict())  # a loaded checkpoint is a new weight
    loaded = layer.quantized
    assert loaded is not first and loaded.parts["codes"] is layer.weight_codes
    layer.weight_codes = layer.weight_codes.clone()  # a new tensor under the same name
    second = layer.quantized
    assert second is not loaded and second.parts["codes"] is layer.weight_codes
    layer.to(torch.float16)  # a move drops the kept one (scales stay fp32, codes uint8)
    third = layer.quantized
    assert third is not second and all(third.parts[k] is v for k, v in layer._buffered_parts().items())
    assert layer.quantized is third
    torch.testing.assert_close(third.dequantize(torch.float32), first.dequantize(torch.float32))


def test_casting_the_module_keeps_scales_fp32():
    layer = QuantLinear.from_linear(nn.Linear(64, 32), qft.QuantConfig(double_quant=False))
    before = layer.dequantize(torch.float32)
    layer.to(torch.bfloat16)
    assert layer.weight_scales.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(torch.float32), before)
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_state_dict_round_trip_and_float_checkpoint_load():
    dense = nn.Linear(64, 32)
    layer = QuantLinear.from_linear(dense)
    other = QuantLinear.from_linear(nn.Linear(64, 32))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.dequantize(), layer.dequantize())
    # An nn.Linear checkpoint (float weight) is quantized on load with the layer's settings.
    other.load_state_dict(dense.state_dict())
    assert torch.equal(other.weight_codes, layer.weight_codes)


def test_checkpoint_for_another_shape_is_rejected_and_layer_kept():
    layer = QuantLinear.from_linear(nn.Linear(64, 32))
    before = layer.weight_codes.clone()
    wrong = QuantLinear.from_linear(nn.Linear(64, 16)).state_dict()
    with pytest.raises(RuntimeError, match=r"shape \(16, 64\), this layer is \(32, 64\)"):
        layer.load_state_dict(wrong)
    assert torch.equal(layer.weight_codes, before)


def test_lora_init_follows_peft_and_leaves_output_unchanged():
    base = QuantLinear.from_linear(nn.Linear(64, 32))
    layer = LoRALinear(base, qft.LoRAConfig(r=8, alpha=16, target_modules=("x",)))
    assert layer.scaling == 2.0 and layer.lora_A.weight.dtype == torch.float32
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), base(x))
    rs = LoRALinear(base, qft.LoRAConfig(r=16, alpha=8, use_rslora=True, target_modules=("x",)))
    assert rs.scaling == 2.0


@pytest.mark.parametrize("quantized", [True, False])
def test_merge_and_unmerge(quantized):
    model = _mlp()
    if quantized:
        qft.quantize_(model)
    qft.add_adapters(model, qft.LoRAConfig(r=4, target_modules=("0",)))
    torch.nn.init.normal_(model[0].lora_B.weight, std=0.05)
    x = torch.randn(5, 64)
    want = model(x)
    model[0].merged = True  # the base layer alone, for reference
    base_only = model(x)
    model[0].merged = False
    with pytest.warns(UserWarning, match="re-quantizes") if quantized else contextlib.nullcontext():
        qft.merge_adapters(model)
    merged = model(x)
    # A merged 4-bit weight is re-quantized: close (NF4 rounding), exact for a float base.
    tol = 0.15 * want.abs().max().item() if quantized else 1e-5
    torch.testing.assert_close(merged, want, atol=tol, rtol=0)
    assert (merged - want).norm() < 0.5 * (merged - base_only).norm(), "the merge must carry the adapter"
    if quantized:
        with pytest.warns(UserWarning):
            qft.unmerge_adapters(model)
    else:
        qft.unmerge_adapters(model)
    assert not model[0].merged


def test_quantize_swaps_linears_with_filter():
    model = _mlp()
    qft.quantize_(model, qft.QuantConfig(), filter_fn=lambda module, name: name != "2")
    assert isinstance(model[0], QuantLinear) and type(model[2]) is nn.Linear


def test_quantize_leaves_model_unchanged_on_error():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        qft.quantize_(model)
    assert type(model[0]) is nn.Linear, "no layer may be swapped when one fails"


def test_add_adapters_targets_by_suffix_and_freezes_the_rest():
    model = nn.ModuleDict({"block": _mlp()})
    qft.quantize_(model)
    qft.add_adapters(model, qft.LoRAConfig(r=4, target_modules=("block.0", "2")))
    layers = qft.nn.lora_layers(model)
    assert set(layers) == {"block.0", "block.2"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"block.{i}.lora_{p}.weight" for i in (0, 2) for p in "AB"}


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: qft.LoRAConfig(r=0, target_modules=("0",)), ValueError, "r must be a positive int"),
        (lambda: qft.LoRAConfig(r=4, dropout=1.0, target_modules=("0",)), ValueError, "dropout"),
        (lambda: qft.LoRAConfig(r=4), ValueError, "target_modules must name"),
        (lambda: qft.QuantConfig(block_size=100), ValueError, "block_size"),
    ],
)
def test_bad_configs_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_add_adapters_errors_leave_model_unchanged():
    model = _mlp()
    with pytest.raises(ValueError, match="no module of the model matches"):
        qft.add_adapters(model, qft.LoRAConfig(target_modules=("q_proj",)))
    with pytest.raises(TypeError, match="not a Linear"):
        qft.add_adapters(model, qft.LoRAConfig(target_modules=("0", "1")))
    assert type(model[0]) is nn.Linear and all(p.requires_grad for p in model.parameters())
    qft.add_adapters(model, qft.LoRAConfig(target_modules=("0",)))
    with pytest.raises(ValueError, match="already has an adapter"):
        qft.add_adapters(model, qft.LoRAConfig(target_modules=("0",)))


def test_save_load_round_trip_and_adapter_for_another_model(tmp_path):
    model = _mlp()
    qft.quantize_(model)
    qft.add_adapters(model, qft.LoRAConfig(r=4, target_modules=("0", "2")))
    torch.nn.init.normal_(model[2].lora_B.weight)
    qft.save_adapters(model, tmp_path / "a")
    fresh = _mlp()
    qft.quantize_(fresh)
    qft.load_adapters(fresh, tmp_path / "a")  # builds the adapters from adapter_config.json
    x = torch.randn(3, 64)
    torch.testing.assert_close(fresh(x), model(x))

    other = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 16))
    qft.add_adapters(other, qft.LoRAConfig(r=4, target_modules=("0", "2")))
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(ValueError, match=r"lora_B: adapter has shape \(32, 4\), model \(16, 4\)"):
        qft.load_adapters(other, tmp_path / "a")
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))
    partial = _mlp()
    qft.add_adapters(partial, qft.LoRAConfig(r=4, target_modules=("0",)))
    with pytest.raises(ValueError, match="does not fit this model"):
        qft.load_adapters(partial, tmp_path / "a")
