"""ETHER / ETHER+ (block-wise reflections): the paper's matrices in float64, gradcheck, what backward
keeps, the layer over quantized and plain bases, merge, files."""

import pytest
import torch
from adapter_checks import assert_merge_round_trip, assert_trains_only_parts_and_files_round_trip, saved_by

import qft
from qft import ops
from qft.adapters.ether import ETHERConfig, ETHERLinear, reflect_blocks
from qft.nn import QuantLinear

TARGETS = ("proj",)


def _dense_h(vectors: torch.Tensor) -> torch.Tensor:
    """The paper's block-diagonal H, built independently: I - 2uu^T/|u|^2 or I - uu^T/|u|^2 + vv^T/|v|^2."""
    k, n, b = vectors.shape
    blocks = []
    for j in range(n):
        u = vectors[0, j] / vectors[0, j].norm()
        if k == 1:
            blocks.append(torch.eye(b, dtype=vectors.dtype) - 2 * torch.outer(u, u))
        else:
            v = vectors[1, j] / vectors[1, j].norm()
            blocks.append(torch.eye(b, dtype=vectors.dtype) - torch.outer(u, u) + torch.outer(v, v))
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("plus", [False, True])
def test_gradcheck_float64(plus):
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    vectors = torch.randn(2 if plus else 1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reflect_blocks, (x, vectors))


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("output_side", [False, True])
def test_layer_is_the_paper_formula(plus, output_side):
    qt = qft.quantize(torch.randn(48, 64), "nf4", 64)
    layer = ETHERLinear(QuantLinear(qt, torch.randn(48)), ETHERConfig(4, plus, output_side, TARGETS, torch.float64))
    with torch.no_grad():
        for part in (layer.ether_in, layer.ether_out):
            part.weight.normal_()  # u != v: away from ETHER+'s identity start
    x = torch.randn(5, 64, dtype=torch.float64)
    w = qt.dequantize(torch.float32).double() @ _dense_h(layer.ether_in.weight)  # W H_in
    if output_side:
        w = _dense_h(layer.ether_out.weight) @ w  # H_out W H_in
    want = x @ w.t() + layer.base_layer.bias.double()
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)


def test_ether_is_orthogonal_and_a_fresh_ether_plus_is_the_identity():
    x = torch.randn(6, 64)
    vectors = torch.randn(1, 4, 16)
    torch.testing.assert_close(reflect_blocks(x, vectors).view(6, 4, 16).norm(dim=-1), x.view(6, 4, 16).norm(dim=-1))
    qt = qft.quantize(torch.randn(48, 64), "nf4", 64)
    layer = ETHERLinear(QuantLinear(qt), ETHERConfig(4, plus=True, output_side=True, target_modules=TARGETS))
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_keeps_x_once_in_its_own_dtype_and_no_weight(dtype):
    qt = qft.quantize(torch.randn(48, 64), "nf4", 64)
    layer = ETHERLinear(QuantLinear(qt), ETHERConfig(4, plus=True, target_modules=TARGETS))
    x = torch.randn(7, 64).to(dtype).requires_grad_()
    assert sorted(saved_by(lambda: layer(x))) == sorted([((7, 64), dtype), ((2, 4, 16), torch.float32)])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_quantized_and_plain_bases_agree(backend):
    qt = qft.quantize(torch.randn(48, 64), "nf4", 64)
    plain = torch.nn.Linear(64, 48)
    with torch.no_grad():
        plain.weight.copy_(qt.dequantize(torch.float32))
    config = ETHERConfig(4, plus=True, output_side=True, target_modules=TARGETS)
    torch.manual_seed(0)
    layers = [ETHERLinear(QuantLinear(qt, plain.bias.detach().clone()), config), ETHERLinear(plain, config)]
    x = torch.randn(40, 64)  # M = 40: the large-M path on the Triton backend
    outs, grads = [], []
    for layer in layers:
        with torch.no_grad():
            torch.manual_seed(1)
            layer.ether_in.weight.normal_()
            layer.ether_out.weight.normal_()
        with ops.use_backend(backend):
            y = layer(x)
            y.square().sum().backward()
        outs.append(y)
        grads.append((layer.ether_in.weight.grad, layer.ether_out.weight.grad))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _ether_run(backend, output_side, m):
    torch.manual_seed(0)
    qt = qft.quantize(torch.randn(64, 64), "nf4", 64)
    layer = ETHERLinear(
        QuantLinear(qt, torch.randn(64)), ETHERConfig(4, plus=True, output_side=output_side, target_modules=TARGETS)
    )
    with torch.no_grad():
        layer.ether_in.weight.normal_()
        layer.ether_out.weight.normal_()
    x = torch.randn(m, 64, requires_grad=True)
    with ops.use_backend(backend):
        y = layer(x)
        y.square().sum().backward()
    return y, x.grad, layer.ether_in.weight.grad, layer.ether_out.weight.grad


@pytest.mark.parametrize("output_side", [False, True])
@pytest.mark.parametrize("m", [4, 40, 80])  # 80 >= N: the weight side
def test_rotation_kernel_path_equals_the_reflections(output_side, m, monkeypatch):
    """Blocks of 16 on the Triton backend go through OFT's rotation kernels (x rotated by each block's
    reflection matrix, or the weight side at M >= N); the reference reflects through the vectors."""
    from qft.adapters.ether import layer as ether_layer

    calls = []
    matrices = ether_layer.block_matrices
    monkeypatch.setattr(ether_layer, "block_matrices", lambda v: calls.append(v.shape) or matrices(v))
    got = _ether_run("triton", output_side, m)
    assert len(calls) == (2 if output_side else 1)
    want = _ether_run("reference", output_side, m)
    assert len(calls) == (2 if output_side else 1)  # the reference took the vectors' path
    for name, g, w in zip(("y", "grad_x", "grad_in", "grad_out"), got, want, strict=True):
        if w is None:
            assert g is None, name
            continue
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item(), msg=name)


@pytest.mark.parametrize("plus", [False, True])
def test_merge_and_unmerge(plus):
    layer = ETHERLinear(torch.nn.Linear(64, 48), ETHERConfig(4, plus, True, TARGETS))
    with torch.no_grad():
        layer.ether_in.weight.normal_()
        layer.ether_out.weight.normal_()
    assert_merge_round_trip(layer, torch.randn(3, 64), 1e-5)


def test_blocks_must_divide_the_reflected_sides():
    qt = qft.quantize(torch.randn(48, 64), "nf4", 64)
    ETHERLinear(QuantLinear(qt), ETHERConfig(8, target_modules=TARGETS))  # 8 | 64; out not reflected
    with pytest.raises(ValueError, match="ETHER blocks 32 do not divide out_features 48"):
        ETHERLinear(QuantLinear(qt), ETHERConfig(32, output_side=True, target_modules=TARGETS))
    with pytest.raises(TypeError, match="plus must be a bool"):
        ETHERConfig(4, plus=1, target_modules=TARGETS)


def test_model_verbs_train_only_the_vectors_and_files_round_trip(tmp_path):
    config = qft.ETHERConfig(blocks=4, plus=True, output_side=True, target_modules=("q_proj", "down_proj"))
    assert_trains_only_parts_and_files_round_trip(config, ("ether_in", "ether_out"), tmp_path)
