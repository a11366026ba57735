"""qft.calibrate (each Linear's X^T X / n from forward hooks, shared by layers reading one tensor) and
quantize_ with method "gptq" over a model."""

import pytest
import torch
from torch import nn

import qft


class _Attention(nn.Module):
    """q and k read the same tensor (one shared statistic), o reads another."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.o = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.o(torch.tanh(self.q(x) * self.k(x)))


def _batches(count=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(8, 64, generator=g)
    return [torch.randn(5, 7, 8, generator=g) @ mix for _ in range(count)]  # correlated features


def test_statistics_are_x_t_x_over_n_and_shared_inputs_share_them():
    torch.manual_seed(0)
    model = _Attention()
    batches = _batches()
    model.train()
    cal = qft.calibrate(model, batches)
    assert model.training  # restored
    x = torch.cat([b.reshape(-1, 64) for b in batches])
    torch.testing.assert_close(cal["q"], x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(cal["k"], cal["q"]) and cal.rows["k"] == cal.rows["q"] == 105
    hidden = torch.cat([torch.tanh(model.q(b) * model.k(b)).reshape(-1, 64) for b in batches]).detach()
    torch.testing.assert_close(cal["o"], hidden.t() @ hidden / 105, rtol=1e-5, atol=1e-5)
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


class _Reuse(nn.Module):
    """a and b read one tensor, b after it was changed in place; in every other call b goes first."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x):
        x = x.clone()
        self.calls += 1
        if self.calls % 2:
            return self.a(x) + self.b(x.mul_(10))
        return self.b(x) + self.a(x)


def test_a_reused_product_needs_the_same_unchanged_tensor():
    model = _Reuse()
    batches = [torch.randn(6, 8) for _ in range(4)]
    cal = qft.calibrate(model, batches)
    xa = torch.cat(batches)
    xb = torch.cat([10 * b if i % 2 == 0 else b for i, b in enumerate(batches)])
    torch.testing.assert_close(cal["a"], xa.t() @ xa / 24, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cal["b"], xb.t() @ xb / 24, rtol=1e-5, atol=1e-5)


def test_gptq_over_a_model_lowers_its_output_error():
    torch.manual_seed(0)
    model = _Attention()
    batches = _batches(4)
    cal = qft.calibrate(model, batches[:3])
    plain, gptq = _copy(model), _copy(model)
    qft.quantize_(plain, qft.QuantConfig("int3", block_size=32))
    qft.quantize_(gptq, qft.QuantConfig("int3", block_size=32, method="gptq", act_order=True), calibration=cal)
    held_out = batches[3]
    want = model(held_out)
    assert (gptq(held_out) - want).norm() < 0.8 * (plain(held_out) - want).norm()


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_refusals():
    model = _Attention()
    with pytest.raises(ValueError, match="calibration statistics"):
        qft.quantize_(model, qft.QuantConfig("int3", block_size=32, method="gptq"))
    cal = qft.calibrate(model, _batches(1), filter_fn=lambda m, name: name != "o")
    with pytest.raises(ValueError, match=r"\['o'\]"):
        qft.quantize_(model, qft.QuantConfig("int3", block_size=32, method="gptq"), calibration=cal)
    assert all(type(m) is nn.Linear for m in (model.q, model.k, model.o))  # nothing changed
    with pytest.raises(ValueError, match="act_order"):
        qft.QuantConfig("int3", act_order=True)
    with pytest.raises(ValueError, match="no calibration batch"):
        qft.calibrate(model, [])
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        qft.calibrate(nn.ReLU(), _batches(1))
