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


def _layers():
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    quant = qft.nn.QuantLinear.from_linear(dense)
    lora = nn.Sequential(qft.nn.QuantLinear.from_linear(dense))
    qft.add_adapters(lora, qft.LoRAConfig(r=4, target_modules=("0",)))
    oft = nn.Sequential(qft.nn.QuantLinear.from_linear(dense))
    qft.add_adapters(oft, qft.OFTConfig(block_size=16, target_modules=("0",)))
    plain_lora = nn.Sequential(nn.Linear(64, 32))
    qft.add_adapters(plain_lora, qft.LoRAConfig(r=4, target_modules=("0",)))
    for model in (lora, oft, plain_lora):
        for name, p in model.named_parameters():
            if "lora_B" in name or "oft_R" in name:
                nn.init.normal_(p, std=0.1)
    return {"nn.Linear": dense, "QuantLinear": quant, "LoRA": lora, "OFT": oft, "LoRA over nn.Linear": plain_lora}


@pytest.mark.parametrize("name", ["nn.Linear", "QuantLinear", "LoRA", "OFT", "LoRA over nn.Linear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_outputs_follow_nn_linear(name, dtype):
    layer = _layers()[name]
    x = torch.randn(5, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
        want = nn.Linear(64, 32)(x)
    assert y.dtype == want.dtype == dtype
    y.float().square().sum().backward()  # backward outside the region, as training loops do
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.dtype == p.dtype == torch.float32 for p in trainable)
    if name == "QuantLinear":  # the values, too: the layer run in that dtype by hand
        with torch.no_grad():
            want = qft.functional.quant_linear(x.detach().to(dtype), layer.quantized, layer.bias.to(dtype))
        assert torch.equal(y, want)


def test_autocast_lora_equals_the_layer_run_in_that_dtype():
    layers = _layers()
    lora = layers["LoRA"]
    x = torch.randn(5, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora(x)
    base, a, b = lora[0].base_layer, lora[0].lora_A.weight, lora[0].lora_B.weight
    xb = x.bfloat16()
    with torch.no_grad():
        want = qft.functional.lora_linear(
            xb, base.quantized, a.bfloat16(), b.bfloat16(), lora[0].scaling, base.bias.bfloat16()
        )
    assert torch.equal(y, want)


def test_backward_inside_an_autocast_region():
    lora = _layers()["LoRA"]
    x = torch.randn(5, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lora(x).float().sum().backward()
    assert lora[0].lora_A.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def _dense_twin(qmodel):
    """An nn.Linear TwoLayer holding the quantized model's decoded weights (PEFT's LoRA runs over it)."""
    from peft_models import TwoLayer

    dense = TwoLayer()
    for name in ("fc1", "fc2"):
        q = getattr(qmodel, name)
        getattr(dense, name).weight.data = q.dequantize(torch.float32)
        getattr(dense, name).bias.data = q.bias.detach().clone()
    return dense


def test_peft_patterns_and_a_regex_target_load_as_peft_reads_them(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from peft_models import TwoLayer

    torch.manual_seed(0)
    qmodel = qft.quantize_(TwoLayer())
    config = LoraConfig(r=8, lora_alpha=16, target_modules=r"fc\d", rank_pattern={"fc2": 4}, alpha_pattern={"fc1": 2})
    peft_model = get_peft_model(_dense_twin(qmodel), config)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p)
    peft_model.save_pretrained(tmp_path / "peft")
    qft.load_adapters(qmodel, tmp_path / "peft")
    layers = qft.nn.lora_layers(qmodel)
    assert {n: (m.r, m.scaling) for n, m in layers.items()} == {"fc1": (8, 2 / 8), "fc2": (4, 16 / 4)}
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), peft_model(x), rtol=1e-5, atol=1e-5)


def test_qft_patterns_save_as_peft_reads_them(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from peft_models import TwoLayer

    torch.manual_seed(0)
    qmodel = qft.quantize_(TwoLayer())
    dense = _dense_twin(qmodel)
    config = qft.LoRAConfig(
        r=8, alpha=16, target_modules=("fc1", "fc2"), rank_pattern={"fc2": 4}, alpha_pattern={"fc1": 2}
    )
    qft.add_adapters(qmodel, config)
    for name, p in qmodel.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p)
    qft.save_adapters(qmodel, tmp_path / "qft")
    peft_model = PeftModel.from_pretrained(dense, tmp_path / "qft")
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), peft_model(x), rtol=1e-5, atol=1e-5)
    assert qft.nn.lora_layers(qmodel)["fc2"].lora_A.weight.shape == (4, 128)


def test_a_target_string_is_one_regular_expression():
    config = qft.LoRAConfig(target_modules=r".*\.q_proj")
    assert config.matches("layers.0.q_proj") and not config.matches("q_proj") and not config.matches("layers.0.k")
    assert qft.OFTConfig(target_modules="fc1").matches("fc1") and not qft.OFTConfig(target_modules="fc1").matches(
        "a.fc1"
    )
    with pytest.raises(ValueError, match="not a regular expression"):
        qft.LoRAConfig(target_modules="fc[")
    with pytest.raises(ValueError, match=r"rank_pattern\['fc1'\] must be a positive int"):
        qft.LoRAConfig(target_modules=("fc1",), rank_pattern={"fc1": 0})


@pytest.mark.parametrize("safe_merge", [True, False])
def test_a_refused_peft_merge_leaves_the_layer_unmerged_and_unchanged(safe_merge):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from peft_models import TwoLayer

    from qft.integrations import peft as qft_peft

    torch.manual_seed(0)
    model = get_peft_model(qft.quantize_(TwoLayer()), qft_peft.register(LoraConfig(r=4, target_modules=["fc1"])))
    layer = model.base_model.model.fc1
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(float("inf"))  # a diverged adapter: its delta is not finite
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaNs in the merged weight" if safe_merge else "finite"):
        layer.merge(safe_merge=safe_merge)
    assert not layer.merged and layer.merged_adapters == []
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_scales_of_the_right_count_in_the_wrong_shape_are_refused():
    qt = qft.quantize(torch.randn(32, 64), "nf4", 64, True)
    with pytest.raises(ValueError, match=r"scales must be 1-D, got shape \(32, 1\)"):
        qft.QuantizedTensor({**qt.parts, "scales": qt.scales.view(-1, 1)}, qt.shape, qt.dtype, "nf4", 64)
    with pytest.raises(ValueError, match="offset must be a 0-dim scalar"):
        qft.QuantizedTensor({**qt.parts, "offset": qt.offset.view(1)}, qt.shape, qt.dtype, "nf4", 64)
    layer = qft.nn.QuantLinear(qt)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = dict(before)
    bad["weight.absmax"] = bad["weight.absmax"].view(-1, 1)
    with pytest.raises(RuntimeError, match="scales must be 1-D"):  # torch's load_state_dict wraps the error
        layer.load_state_dict(bad)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("part", ["weight.absmax", "weight.nested_absmax", "offset"])
def test_non_finite_stored_scales_are_refused_at_load(part):
    double_quant = part != "weight.absmax"  # with double quantization absmax holds uint8 codes
    layer = qft.nn.QuantLinear(qft.quantize(torch.randn(32, 64), "nf4", 64, double_quant))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    target = qft.nn.QuantLinear(qft.quantize(torch.randn(32, 64), "nf4", 64, double_quant))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    if part == "offset":  # bitsandbytes' layout keeps the offset in the JSON quant state
        key = next(k for k in state if k.startswith("weight.quant_state."))
        meta = json.loads(bytes(state[key].tolist()).decode())
        meta["nested_offset"] = float("nan")
        state[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    else:
        state[part] = state[part].clone().fill_(float("nan"))
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        target.load_state_dict(state)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


def test_bitsandbytes_state_with_a_wrong_shape_or_nan_is_refused():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    packed, state = bnb_functional.quantize_4bit(torch.randn(32, 64), blocksize=64, quant_type="nf4")
    qft.QuantizedTensor.from_bnb(packed, state)
    state.absmax = state.absmax.view(-1, 1)
    with pytest.raises(ValueError, match="scales must be 1-D"):
        qft.QuantizedTensor.from_bnb(packed, state)
    state.absmax = state.absmax.view(-1).clone().fill_(float("nan"))
    with pytest.raises(ValueError, match="scales holds NaN"):
        qft.QuantizedTensor.from_bnb(packed, state)


def test_quant_linear_load_state_dict_copies_and_reports_unknown_weight_keys():
    source = qft.nn.QuantLinear(qft.quantize(torch.randn(32, 64)), torch.zeros(32))
    state = source.state_dict()
    target = qft.nn.QuantLinear(qft.quantize(torch.randn(32, 64)), torch.zeros(32))
    target.load_state_dict(state)
    ours = [t.data_ptr() for t in target.state_dict().values() if t.numel()]
    assert not set(ours) & {t.data_ptr() for t in state.values() if t.numel()}, "aliases the caller's tensors"
    x = torch.randn(3, 64)
    assert torch.equal(target(x), source(x))
    extra = {**state, "weight.bogus": torch.zeros(1)}
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"weight.bogus\""):
        target.load_state_dict(extra)
    result = target.load_state_dict(extra, strict=False)
    assert result.unexpected_keys == ["weight.bogus"]


def test_save_adapters_replaces_a_symlink_instead_of_writing_through_it(saved):
    source, tmp = saved
    outside = tmp / "elsewhere.bin"
    outside.write_bytes(b"precious")
    folder = tmp / "out"
    folder.mkdir()
    (folder / "adapter_model.safetensors").symlink_to(outside)
    qft.save_adapters(source, folder)
    assert outside.read_bytes() == b"precious"
    assert not (folder / "adapter_model.safetensors").is_symlink()
    model = _model()
    qft.load_adapters(model, folder)
    x = torch.randn(3, 64)
    torch.testing.assert_close(model(x), source(x))
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("verb", ["merge_and_unload", "unload"])
def test_peft_oft_over_quant_linear_merges_and_unloads(verb):
    pytest.importorskip("peft")
    from peft import OFTConfig
    from peft import get_peft_model as peft_model
    from peft_models import TwoLayer

    from qft.integrations import peft as qft_peft

    torch.manual_seed(0)
    base = qft.quantize_(TwoLayer())
    x = torch.randn(5, 64)
    with torch.no_grad():
        plain = base(x)
    qft_peft.enable_oft()
    try:
        model = peft_model(base, OFTConfig(r=0, oft_block_size=16, target_modules=["fc1", "fc2"]))
    finally:
        qft_peft.disable_oft()
    for name, p in model.named_parameters():
        if "oft_R" in name:
            nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        adapted = model(x)
        assert (adapted - plain).abs().max() > 1e-2  # the rotation is real work
        out = getattr(model, verb)()
        assert type(out.fc1) is qft.nn.QuantLinear and type(out.fc2) is qft.nn.QuantLinear
        if verb == "unload":
            assert torch.equal(out(x), plain)
        else:  # merged into re-quantized weights: the rotation is in (without it the error would be the
            # whole adapter effect); what is left is the 4-bit rounding of the merged weight (~0.08 here).
            assert (out(x) - adapted).abs().max() < 0.5 * (adapted - plain).abs().max()


def test_assigning_a_quant_linear_weight_is_refused_with_a_pointer_to_set_weight():
    layer = qft.nn.QuantLinear(qft.quantize(torch.randn(32, 64)))
    layer.weight = layer.weight  # what PEFT's unload does: a no-op
    with pytest.raises(AttributeError, match="set_weight"):
        layer.weight = torch.zeros(32, 64)


@pytest.mark.parametrize("autocast_adapter_dtype", [False, True])
def test_peft_adapters_over_a_bf16_quantized_base_follow_autocast_adapter_dtype(autocast_adapter_dtype):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from peft_models import TwoLayer

    from qft.integrations import peft as qft_peft

    base = qft.quantize_(TwoLayer(dtype=torch.bfloat16))
    assert base.fc1.compute_dtype == torch.bfloat16
    config = qft_peft.register(LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    model = get_peft_model(base, config, autocast_adapter_dtype=autocast_adapter_dtype)
    dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float32 if autocast_adapter_dtype else torch.bfloat16}
    assert model(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
