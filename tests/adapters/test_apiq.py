"""ApiQ's layer-wise init (qft.adapters.lora.apiq): quantized weight and LoRA factors chosen together to
keep the layer's output on calibration inputs, against LoftQ, which keeps the weight."""

from __future__ import annotations

import pytest
import torch

import qft
from qft.adapters.lora.apiq import apiq, output_error
from qft.adapters.lora.function import loftq


def _layer_and_inputs(seed=0, k=128, n=96, rows=1024):
    """A weight with structure, calibration inputs whose features differ in scale and correlate, as
    real activations do (where keeping the output and keeping the weight part ways), and ``draw(rows)``
    for more inputs from the same distribution."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g) / 3 + 0.3 * torch.randn(n, k, generator=g)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scale = torch.exp(torch.randn(k, generator=g))

    def draw(count):
        return (torch.randn(count, k, generator=g) @ mix) * scale

    return w * 0.05, draw(rows), draw


def _start_error(qt, a, b, w, h, scaling):
    return output_error(w - qt.dequantize(torch.float32) - scaling * (b @ a), h)


@pytest.mark.parametrize("fmt", ["nf4", "int3", "int2", "lloyd2"])
@pytest.mark.parametrize("method", ["hqq", "gptq"])
def test_apiq_keeps_the_calibration_output_better_than_loftq(fmt, method):
    w, x, draw = _layer_and_inputs()
    h = x.t() @ x / x.shape[0]
    quant = qft.QuantConfig(fmt, 64, method=method, act_order=method == "gptq")
    lora = qft.LoRAConfig(r=8, alpha=16, target_modules=("layer",))
    errors = {}
    for name, init in (("apiq", lambda: apiq(w, h, quant, lora)), ("loftq", lambda: loftq(w, quant, lora, h))):
        qt, a, b = init()
        errors[name] = _start_error(qt, a, b, w, h, lora.scaling)
    assert 0 < errors["apiq"] < 0.9 * errors["loftq"], errors
    # and on inputs it was not fitted to, from the same distribution: it fits the statistics, not the rows
    held = draw(8192)
    h_held = held.t() @ held / held.shape[0]
    qt, a, b = apiq(w, h, quant, lora)
    lq, la, lb = loftq(w, quant, lora, h)
    assert _start_error(qt, a, b, w, h_held, lora.scaling) < 0.9 * _start_error(lq, la, lb, w, h_held, lora.scaling)


def test_the_whitened_fit_is_the_best_rank_r_correction_for_its_weight():
    """Given its Q, ApiQ's s B A minimises tr(E H E^T) over rank r under the damped H it fits (GPTQ's 1%
    of the mean diagonal): no random rank-r step lowers it."""
    w, x, _ = _layer_and_inputs(seed=1)
    h = x.t() @ x / x.shape[0]
    lora = qft.LoRAConfig(r=4, alpha=8, target_modules=("layer",))
    qt, a, b = apiq(w, h, qft.QuantConfig("int2", 64), lora)
    h = h + 0.01 * torch.diagonal(h).mean() * torch.eye(h.shape[0])
    residual = w - qt.dequantize(torch.float32)
    best = output_error(residual - lora.scaling * (b @ a), h)
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        step_b = 1e-3 * torch.randn(b.shape, generator=g)
        step_a = 1e-3 * torch.randn(a.shape, generator=g)
        moved = output_error(residual - lora.scaling * ((b + step_b) @ (a + step_a)), h)
        assert moved >= best * (1 - 1e-6)
    # a fit to the weight alone (LoftQ's SVD of the same residual) is worse under H
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    assert output_error(residual - (u[:, :4] * s[:4]) @ vh[:4], h) > best


def test_apiq_through_add_adapters_uses_each_layers_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    batches = [torch.randn(16, 64) * torch.linspace(0.1, 3, 64) for _ in range(4)]
    calibration = qft.calibrate(model, batches)
    quant = qft.QuantConfig("int2", 64)
    config = qft.LoRAConfig(r=4, target_modules=("0", "2"), init="apiq")
    fitted = qft.add_adapters(
        torch.nn.Sequential(*[m for m in __import__("copy").deepcopy(model)]), config, quant, calibration
    )
    for name in ("0", "2"):
        layer = fitted.get_submodule(name)
        w = model.get_submodule(name).weight.detach()
        qt, a, b = apiq(w, calibration[name], quant, qft.LoRAConfig(r=4, target_modules=(name,)))
        assert torch.equal(layer.lora_A.weight, a) and torch.equal(layer.lora_B.weight, b)
        assert torch.equal(layer.base_layer.dequantize(torch.float32), qt.dequantize(torch.float32))
    x = torch.randn(8, 64)
    assert fitted(x).shape == (8, 32)


def test_apiq_needs_statistics_for_every_target_and_changes_nothing_without():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
    calibration = qft.calibrate(model, [torch.randn(8, 64)], filter_fn=lambda m, name: name == "0")
    config = qft.LoRAConfig(r=4, target_modules=("0", "1"), init="apiq")
    before = [type(m) for m in model]
    with pytest.raises(ValueError, match="init='apiq' needs calibration statistics for '1'"):
        qft.add_adapters(model, config, qft.QuantConfig("int2", 64), calibration)
    with pytest.raises(ValueError, match="init='apiq' needs calibration statistics"):
        qft.add_adapters(model, config, qft.QuantConfig("int2", 64))
    assert [type(m) for m in model] == before
    with pytest.raises(ValueError, match="init must be one of"):
        qft.LoRAConfig(r=4, target_modules=("0",), init="apiq2")


def test_loftq_over_gptq_quantizes_under_the_layers_statistics():
    w, x, _ = _layer_and_inputs(seed=3)
    h = x.t() @ x / x.shape[0]
    lora = qft.LoRAConfig(r=4, alpha=8, target_modules=("layer",), loftq_iters=1)
    qt, _, _ = loftq(w, qft.QuantConfig("int3", 64, method="gptq"), lora, h)
    want = qft.quantize(w, "int3", 64, method="gptq", hessian=h)
    assert torch.equal(qt.codes, want.codes)
