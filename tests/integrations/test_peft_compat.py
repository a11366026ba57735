"""qft LoRA against PEFT LoRA over bitsandbytes Linear4bit, on the same NF4 bytes (CPU)."""

import pytest
import torch
from peft_models import TwoLayer, bnb_peft_model, qft_twin, randomize_lora_B

import qft


def _fp64_reference(qmodel, x, grad):
    """The same network in float64 from qft's decoded weights and adapters: (y, grad_x, adapter grads)."""
    params = {}
    for name in ("fc1", "fc2"):
        layer = getattr(qmodel, name)
        params[name] = [
            layer.base_layer.dequantize(layer.base_layer.bias.dtype).double(),
            layer.base_layer.bias.detach().double(),
            layer.lora_A.weight.detach().double().requires_grad_(),
            layer.lora_B.weight.detach().double().requires_grad_(),
            layer.scaling,
        ]
    xd = x.detach().double().requires_grad_()
    h = xd
    for name in ("fc1", "fc2"):
        w, b, a, bb, s = params[name]
        h = h @ w.t() + b + (h @ a.t() @ bb.t()) * s
        if name == "fc1":
            h = torch.nn.functional.gelu(h)
    h.backward(grad.double())
    grads = {f"{n}.{p}": params[n][i].grad for n in ("fc1", "fc2") for i, p in ((2, "lora_A"), (3, "lora_B"))}
    return h.detach(), xd.grad, grads


def _rel_err(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_forward_and_grads_within_twice_peft_error(dtype):
    dense = TwoLayer(dtype=dtype)
    peft_model = bnb_peft_model(dense, dtype)
    randomize_lora_B(peft_model)
    ours = qft_twin(peft_model, dtype)
    x = torch.randn(3, 5, 64, dtype=dtype)
    x_peft, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_peft, y_ours = peft_model(x_peft), ours(x_ours)
    assert y_ours.dtype == dtype and y_ours.shape == (3, 5, 64)
    grad = torch.randn_like(y_peft)
    y_peft.backward(grad)
    y_ours.backward(grad)
    y_ref, gx_ref, g_ref = _fp64_reference(ours, x, grad)
    floor = 1e-6  # fp32 cases: both errors are at rounding level; compare above it
    assert _rel_err(y_ours, y_ref) <= 2 * _rel_err(y_peft, y_ref) + floor
    assert _rel_err(x_ours.grad, gx_ref) <= 2 * _rel_err(x_peft.grad, gx_ref) + floor
    base = peft_model.base_model.model
    for key, ref in g_ref.items():
        name, part = key.split(".")
        theirs = getattr(getattr(base, name), part)["default"].weight.grad
        mine = getattr(getattr(ours, name), part).weight.grad
        assert mine.dtype == torch.float32, "fp32 adapters get fp32 grads"
        assert _rel_err(mine, ref) <= 2 * _rel_err(theirs, ref) + floor, key


def test_base_path_is_bitsandbytes_forward_exactly():
    # With B = 0 (PEFT's init) the outputs are the base layers: same bytes, same decoded weights.
    dense = TwoLayer(dtype=torch.float32)
    peft_model = bnb_peft_model(dense, torch.float32)
    ours = qft_twin(peft_model, torch.float32)
    x = torch.randn(7, 64)
    torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-5, atol=1e-5)
    base = peft_model.base_model.model
    assert torch.equal(ours.fc1.base_layer.dequantize(torch.float32), _bnb_weight(base.fc1.base_layer))


def _bnb_weight(layer):
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def test_training_curve_matches_peft_bitsandbytes():
    torch.manual_seed(0)
    dense = TwoLayer(dtype=torch.float32)
    peft_model = bnb_peft_model(dense, torch.float32)
    ours = qft_twin(peft_model, torch.float32)
    data = torch.randn(16, 64)
    target = torch.randn(16, 64)
    losses = {}
    for label, model in (("peft", peft_model), ("qft", ours)):
        params = [p for p in model.parameters() if p.requires_grad]
        assert len(params) == 4
        opt = torch.optim.AdamW(params, lr=1e-2)
        curve = []
        for _ in range(100):
            loss = torch.nn.functional.mse_loss(model(data), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses[label] = torch.tensor(curve)
    assert losses["qft"][-1] < 0.8 * losses["qft"][0], "training must reduce the loss"
    torch.testing.assert_close(losses["qft"], losses["peft"], rtol=2e-3, atol=1e-5)


def test_adapters_move_between_qft_and_peft(tmp_path):
    from peft import PeftModel

    dense = TwoLayer(dtype=torch.float32)
    peft_model = bnb_peft_model(dense, torch.float32)
    randomize_lora_B(peft_model)
    ours = qft_twin(peft_model, torch.float32)
    x = torch.randn(4, 64)

    # PEFT -> qft: a fresh qft model (no adapters yet) builds them from adapter_config.json.
    peft_model.save_pretrained(tmp_path / "from_peft")
    fresh = qft_twin(bnb_peft_model(dense, torch.float32), torch.float32)
    for layer in qft.nn.lora_layers(fresh).values():
        torch.nn.init.zeros_(layer.lora_A.weight)
    qft.load_adapters(fresh, tmp_path / "from_peft")
    torch.testing.assert_close(fresh(x), ours(x))

    # qft -> PEFT: PeftModel.from_pretrained reads what qft saved.
    with torch.no_grad():
        ours.fc2.lora_B.weight.mul_(3)
    qft.save_adapters(ours, tmp_path / "from_qft")
    plain = bnb_peft_model(dense, torch.float32).base_model.model
    for name in ("fc1", "fc2"):
        setattr(plain, name, getattr(plain, name).base_layer)
    # is_trainable keeps bitsandbytes out of its eval-mode CPU kernel, which computes in bf16.
    loaded = PeftModel.from_pretrained(plain, tmp_path / "from_qft", is_trainable=True)
    for name in ("fc1", "fc2"):
        theirs = getattr(loaded.base_model.model, name)
        assert torch.equal(theirs.lora_B["default"].weight, getattr(ours, name).lora_B.weight)
        assert theirs.scaling["default"] == getattr(ours, name).scaling
    torch.testing.assert_close(loaded(x), ours(x))


def test_quant_linear_state_dict_is_bitsandbytes_linear4bit():
    import bitsandbytes as bnb

    dense = torch.nn.Linear(64, 32)
    ours = qft.nn.QuantLinear.from_linear(dense)
    state = ours.state_dict()
    assert set(state) == {
        "weight",
        "bias",
        "weight.absmax",
        "weight.quant_map",
        "weight.nested_absmax",
        "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4",
    }
    theirs = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    theirs.load_state_dict(dense.state_dict())
    theirs = theirs.to("cpu")
    ref = theirs.state_dict()
    assert torch.equal(state["weight"], ref["weight"])
    # bitsandbytes reads qft's keys the way its loaders do (Params4bit.from_prequantized) and
    # computes the same layer.
    stats = {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu", module=theirs)
    theirs.bias = torch.nn.Parameter(state["bias"])
    x = torch.randn(5, 64)
    torch.testing.assert_close(theirs(x), ours(x))
