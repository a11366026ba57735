"""HRA against PEFT's HRA layer on an nn.Linear holding the same dequantized weight: outputs and
gradients (fp32 and bf16, several r, with and without Gram-Schmidt), files both ways, what backward
keeps, gradcheck."""

import pytest
import torch
from adapter_checks import (
    assert_equal_to_peft,
    assert_files_move_between_qft_and_peft,
    assert_merge_round_trip,
    quantized_and_dense_twins,
    saved_by,
)

import qft
from qft.adapters.hra import HRAConfig, HRALinear, householder
from qft.nn import QuantLinear

TARGETS = ("fc1", "fc2")


def _twins(dtype, r, apply_gs, seed=0):
    """(PEFT HRA over nn.Linear with qft's dequantized weights, qft HRA over the quantized ones), same vectors."""
    from peft import HRAConfig as PeftHRAConfig
    from peft import get_peft_model

    ours, dense = quantized_and_dense_twins(dtype, TARGETS, seed)
    peft_model = get_peft_model(dense, PeftHRAConfig(r=r, apply_GS=apply_gs, target_modules=list(TARGETS)))
    qft.add_adapters(ours, qft.HRAConfig(r=r, apply_GS=apply_gs, target_modules=TARGETS))
    with torch.no_grad():
        for name in TARGETS:
            u = torch.randn_like(getattr(ours, name).hra_u)  # away from the identity start
            getattr(peft_model.base_model.model, name).hra_u["default"].copy_(u)
            getattr(ours, name).hra_u.copy_(u)
    return peft_model, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r,apply_gs", [(2, False), (4, False), (8, False), (3, False), (4, True), (8, True)])
def test_forward_and_grads_equal_peft(dtype, r, apply_gs):
    peft_model, ours = _twins(dtype, r, apply_gs)
    # fp32: the same products in another order; bf16: PEFT keeps x H^T in fp32, qft rounds it to bf16
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: 7.6e-3 at worst over these cases
    parts = {name: [("hra_u", "hra_u")] for name in TARGETS}
    assert_equal_to_peft(peft_model, ours, torch.randn(6, 64).to(dtype), parts, tol)


def test_init_matches_peft_start():
    layer = HRALinear(QuantLinear(qft.quantize(torch.randn(48, 64), "nf4", 64)), HRAConfig(r=4, target_modules=TARGETS))
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=1e-5, atol=1e-5)  # pairs: the identity
    assert torch.equal(layer.hra_u[:, 0], layer.hra_u[:, 1])
    with pytest.warns(UserWarning, match="odd r"):
        HRALinear(torch.nn.Linear(64, 48), HRAConfig(r=3, target_modules=TARGETS))


def test_adapters_move_between_qft_and_peft(tmp_path):
    peft_model, ours = _twins(torch.float32, 4, False)
    assert_files_move_between_qft_and_peft(peft_model, ours, TARGETS, tmp_path, lambda m: m.fc2.hra_u.mul_(-1.5), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_keeps_x_once_in_its_own_dtype_and_no_weight(dtype):
    layer = HRALinear(QuantLinear(qft.quantize(torch.randn(48, 64), "nf4", 64)), HRAConfig(r=4, target_modules=TARGETS))
    x = torch.randn(7, 64).to(dtype).requires_grad_()
    big = [(shape, dt) for shape, dt in saved_by(lambda: layer(x)) if torch.Size(shape).numel() >= 7 * 64]
    assert big == [((7, 64), dtype)]  # x once; the rest are [64, 4]-sized vectors and norms


@pytest.mark.parametrize("apply_gs", [False, True])
def test_gradcheck_float64(apply_gs):
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    u = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, u: householder(x, u, apply_gs), (x, u))


def test_merge_and_unmerge():
    layer = HRALinear(torch.nn.Linear(64, 48), HRAConfig(r=4, init_weights=False, target_modules=TARGETS))
    assert_merge_round_trip(layer, torch.randn(3, 64), 1e-5)


def test_bf16_vectors_and_autocast_still_reflect_in_fp32():
    x, u = torch.randn(5, 64), torch.randn(64, 4)
    want = householder(x.double(), u.double()).float()
    got = householder(x, u.to(torch.bfloat16))  # U rounded to bf16, the reflection still in fp32
    assert (got - householder(x, u.to(torch.bfloat16).float())).abs().max() == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = householder(x, u)
    assert under_autocast.dtype == torch.float32
    assert (under_autocast - want).abs().max() < 1e-5  # not bf16 products (about 1e-2 off)
    assert (got - want).abs().max() > 1e-4  # the bf16 vectors do differ from fp32 ones
