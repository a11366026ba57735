"""DiaBlo (W + blockdiag(D)): the paper's formula, float64 gradcheck, what backward keeps, the layer over
quantized and plain bases, merge, files."""

import pytest
import torch
from adapter_checks import assert_merge_round_trip, assert_trains_only_parts_and_files_round_trip, saved_by

import qft
from qft import ops
from qft.adapters.diablo import DiaBloConfig, DiaBloLinear, diablo_linear
from qft.nn import QuantLinear
from qft.ops import gemm


def _weights(out=48, inp=64, blocks=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qt = qft.quantize(torch.randn(out, inp, generator=g), "nf4", 64)
    d = 0.1 * torch.randn(blocks, out // blocks, inp // blocks, generator=g, dtype=dtype)
    return qt, d


@pytest.mark.parametrize("blocks", [1, 4, 16])
def test_is_the_paper_formula(blocks):
    qt, d = _weights(blocks=blocks, dtype=torch.float64)
    x, bias = torch.randn(5, 64, dtype=torch.float64), torch.randn(48, dtype=torch.float64)
    w = qt.dequantize(torch.float32).double() + torch.block_diag(*d)  # W + blockdiag(D_1..D_N)
    torch.testing.assert_close(diablo_linear(x, qt, d, bias), x @ w.t() + bias, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    qt, d = _weights(blocks=4, dtype=torch.float64)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(48, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, d, b: diablo_linear(x, qt, d, b), (x, d.requires_grad_(), bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_keeps_x_once_in_its_own_dtype_and_no_weight(dtype):
    qt, d = _weights()
    x = torch.randn(7, 64).to(dtype).requires_grad_()
    saved = saved_by(lambda: diablo_linear(x, qt, d.requires_grad_()))
    assert sorted(saved) == sorted([((7, 64), dtype), ((4, 12, 16), torch.float32)])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_layer_over_quantized_and_plain_bases_agree(backend):
    qt, d = _weights()
    plain = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        plain.weight.copy_(qt.dequantize(torch.float32))
    layers = [
        DiaBloLinear(QuantLinear(qt), DiaBloConfig(blocks=4, target_modules=("proj",))),
        DiaBloLinear(plain, DiaBloConfig(blocks=4, target_modules=("proj",))),
    ]
    x = torch.randn(40, 64)  # M = 40: the large-M path on the Triton backend
    assert torch.equal(layers[0](x), layers[0].base_layer(x))  # fresh: D = 0 changes nothing
    outs, grads = [], []
    for layer in layers:
        with torch.no_grad():
            layer.diablo_D.weight.copy_(d)
        with ops.use_backend(backend):
            y = layer(x)
            y.square().sum().backward()
        outs.append(y)
        grads.append(layer.diablo_D.weight.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)


def test_add_blockdiag_touches_only_the_diagonal_blocks():
    w, d = torch.randn(48, 64), torch.randn(4, 12, 16)
    want = w + torch.block_diag(*d)
    assert torch.equal(gemm.add_blockdiag(w, d), want)


def _diablo_run(backend, dtype):
    qt, d = _weights()
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    d.requires_grad_()
    with ops.use_backend(backend):
        y = diablo_linear(x, qt, d, torch.ones(48).to(dtype))
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype))
    return y.detach(), x.grad, d.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_m_adds_d_to_the_decoded_weight(dtype, monkeypatch):
    calls = []
    add = gemm.add_blockdiag
    monkeypatch.setattr(gemm, "add_blockdiag", lambda w, blocks: calls.append(w.shape) or add(w, blocks))
    got = _diablo_run("triton", dtype)  # M = 40: decode into scratch + one GEMM, forward and grad_x
    assert calls == [(48, 64), (48, 64)]
    want = _diablo_run("reference", dtype)
    # fp32: the same sums in another order; bf16: W + D rounded to bf16 (the reference adds x D^T in fp32)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    for name, g, w in zip(("y", "grad_x", "grad_D"), got, want, strict=True):
        assert g.dtype == w.dtype, name
        assert ((g.float() - w.float()).abs().max() / w.float().abs().max()).item() <= tol, name


def test_merge_and_unmerge():
    _, d = _weights()
    plain = torch.nn.Linear(64, 48)
    layer = DiaBloLinear(plain, DiaBloConfig(blocks=4, target_modules=("proj",)))
    with torch.no_grad():
        layer.diablo_D.weight.copy_(d)
    assert_merge_round_trip(layer, torch.randn(3, 64), 1e-6)


def test_blocks_must_divide_both_sides():
    qt, _ = _weights()
    with pytest.raises(ValueError, match="must divide in_features 64 and out_features 48"):
        DiaBloLinear(QuantLinear(qt), DiaBloConfig(blocks=5, target_modules=("proj",)))
    with pytest.raises(ValueError, match="blocks must be a positive int"):
        DiaBloConfig(blocks=0)


def test_model_verbs_train_only_d_and_files_round_trip(tmp_path):
    config = qft.DiaBloConfig(blocks=4, target_modules=("q_proj", "v_proj", "down_proj"))
    assert_trains_only_parts_and_files_round_trip(config, ("diablo_D",), tmp_path)


def test_config_file_fields_round_trip_and_bad_dtype_is_refused():
    from qft.adapters.diablo import SPEC

    config = DiaBloConfig(blocks=8, target_modules=("q_proj",), adapter_dtype=torch.bfloat16)
    raw = {**SPEC.to_peft(config), "target_modules": ["q_proj"]}
    assert SPEC.from_peft(raw) == config
    with pytest.raises(ValueError, match="adapter_dtype 'float13' is not a torch dtype"):
        SPEC.from_peft({**raw, "adapter_dtype": "float13"})
