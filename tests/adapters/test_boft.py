"""BOFT against PEFT's BOFT layer on an nn.Linear holding the same dequantized weight: permutations,
Cayley blocks, outputs and gradients (fp32 and bf16, several block sizes and factor counts), dropout
under one seed, files both ways, what backward keeps, gradcheck, merge, PEFT's config checks.

PEFT builds its multi-factor block diagonal with a CUDA extension it compiles at run time, and without
it silently trains one factor; the tests give it ``cpu_block_diag``, which does the same on the CPU."""

import pytest
import torch
from adapter_checks import (
    assert_equal_to_peft,
    assert_files_move_between_qft_and_peft,
    assert_merge_round_trip,
    assert_trains_only_parts_and_files_round_trip,
    quantized_and_dense_twins,
    relative_error,
    saved_by,
)
from peft_models import TwoLayer

import qft
from qft.adapters.boft import BOFTConfig, BOFTLinear, butterfly_blocks, butterfly_perms, butterfly_product, cayley
from qft.nn import QuantLinear

TARGETS = ("fc1", "fc2")


class _CpuBlockDiag:
    """PEFT's ``fbd_cuda`` interface: [N, D, b, b] -> [N, D b, D b] and back."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad, blocks):
        _, d, b, _ = blocks.shape
        return [
            torch.stack([torch.stack([g[c * b : (c + 1) * b, c * b : (c + 1) * b] for c in range(d)]) for g in grad])
        ]


@pytest.fixture(autouse=True)
def cpu_block_diag(monkeypatch):
    import peft.tuners.boft.layer as peft_boft

    monkeypatch.setattr(peft_boft, "_FBD_CUDA", _CpuBlockDiag)


def _peft_config(**kwargs):
    from peft import BOFTConfig as PeftBOFTConfig

    return PeftBOFTConfig(target_modules=list(TARGETS), **kwargs)


def _twins(dtype, seed=0, **kwargs):
    """(PEFT BOFT over nn.Linear with qft's dequantized weights, qft BOFT over the quantized ones), same
    random R and s."""
    from peft import get_peft_model

    ours, dense = quantized_and_dense_twins(dtype, TARGETS, seed)
    peft_model = get_peft_model(dense, _peft_config(**kwargs))
    qft.add_adapters(ours, qft.BOFTConfig(target_modules=TARGETS, **kwargs))
    with torch.no_grad():
        for name in TARGETS:
            layer, theirs = getattr(ours, name), getattr(peft_model.base_model.model, name)
            layer.boft_R.normal_(0, 0.3)  # away from the identity start
            layer.boft_s.normal_(1, 0.2)
            theirs.boft_R["default"].copy_(layer.boft_R)
            theirs.boft_s["default"].copy_(layer.boft_s)
    return peft_model, ours


CONFIGS = [
    {"boft_block_size": 4},
    {"boft_block_size": 4, "boft_n_butterfly_factor": 2},
    {"boft_block_size": 8, "boft_n_butterfly_factor": 3},
    {"boft_block_size": 2, "boft_n_butterfly_factor": 4},
    {"boft_block_size": 0, "boft_block_num": 8, "boft_n_butterfly_factor": 2},
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_permutations_and_blocks_are_peft_s(kwargs):
    peft_model, ours = _twins(torch.float32, **kwargs)
    for name in TARGETS:
        layer, theirs = getattr(ours, name), getattr(peft_model.base_model.model, name)
        eye = torch.eye(layer.in_features)
        assert torch.equal(eye[layer.boft_perms], theirs.boft_P)  # row i of P_i holds a one at perms[i]
        r = layer.boft_R.detach()
        torch.testing.assert_close(cayley(r), theirs.cayley_batch(r.flatten(0, 1)).view_as(r), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kwargs", CONFIGS)
def test_forward_and_grads_equal_peft(dtype, kwargs):
    peft_model, ours = _twins(dtype, **kwargs)
    # fp32: the same products in another order. bf16: PEFT multiplies its factors and x in bf16,
    # qft applies them in fp32 and rounds once.
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-6  # measured worst: 1.4e-2 (bf16), 4.7e-7 (fp32)
    parts = {name: [("boft_R", "boft_R"), ("boft_s", "boft_s")] for name in TARGETS}
    assert_equal_to_peft(peft_model, ours, torch.randn(6, 64).to(dtype), parts, tol)


def test_bf16_is_nearer_the_exact_product_than_peft():
    import copy

    peft_model, ours = _twins(torch.bfloat16, boft_block_size=4, boft_n_butterfly_factor=3)
    exact = copy.deepcopy(peft_model).double()  # the same weights and adapters, in fp64
    x = torch.randn(32, 64).to(torch.bfloat16)
    with torch.no_grad():
        want = exact(x.double())
        assert relative_error(ours(x), want) < relative_error(peft_model(x), want)


def test_dropout_draws_peft_s_blocks_under_one_seed():
    peft_model, ours = _twins(torch.float32, boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.5)
    peft_model.train()
    ours.train()
    x = torch.randn(5, 64)
    torch.manual_seed(3)
    want = peft_model(x)
    torch.manual_seed(3)
    torch.testing.assert_close(ours(x), want, rtol=2e-5, atol=2e-5)
    ours.eval()
    assert not torch.allclose(ours(x), want, rtol=1e-3, atol=1e-3)  # the dropout did act


def test_adapters_move_between_qft_and_peft(tmp_path):
    peft_model, ours = _twins(torch.float32, boft_block_size=4, boft_n_butterfly_factor=2)

    def change(model):
        model.fc2.boft_R.mul_(-1.5)
        model.fc1.boft_s.mul_(0.5)

    assert_files_move_between_qft_and_peft(peft_model, ours, TARGETS, tmp_path, change, 2e-5)


def test_trains_only_r_and_s_and_files_round_trip(tmp_path):
    config = qft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "down_proj"])
    assert_trains_only_parts_and_files_round_trip(config, ("boft_R", "boft_s"), tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_keeps_x_once_in_its_own_dtype_and_no_weight(dtype):
    config = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=3, target_modules=TARGETS)
    layer = BOFTLinear(QuantLinear(qft.quantize(torch.randn(48, 64), "nf4", 64)), config)
    x = torch.randn(7, 64).to(dtype).requires_grad_()
    saved = saved_by(lambda: layer(x))
    activations = sorted(s for s in saved if s[0][:1] == (7,))
    # x for the butterfly, and the base output before the scale (for s's gradient), each once
    assert activations == [((7, 48), dtype), ((7, 64), dtype)], saved
    assert all(torch.Size(shape).numel() < 48 * 64 for shape, _ in saved)  # nothing weight-sized


def test_blocks_are_the_butterfly_product_and_gradcheck_float64():
    perms = butterfly_perms(32, 8, 4, 3)  # groups of 16
    r = torch.randn(3, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 32, dtype=torch.float64)
    blocks = butterfly_blocks(cayley(r), perms, 16)
    assert blocks.shape == (2, 16, 16)
    assert torch.allclose(x @ torch.block_diag(*blocks), butterfly_product(x, cayley(r), perms))  # M is block diagonal
    qt = qft.quantize(torch.randn(24, 32), "nf4", 32)
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, r: qft.adapters.oft.rotated_linear(x, qt, butterfly_blocks(cayley(r), perms, 16)), (x, r)
    )


def test_identity_at_the_start_and_merge_round_trip():
    base = QuantLinear(qft.quantize(torch.randn(48, 64), "nf4", 64), torch.randn(48))
    layer = BOFTLinear(base, BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=TARGETS))
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)
    config = BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, init_weights=False, target_modules=TARGETS)
    plain = BOFTLinear(torch.nn.Linear(64, 48), config)
    assert_merge_round_trip(plain, x, 1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"boft_block_size": 6},  # does not divide 64
        {"boft_block_size": 0, "boft_block_num": 3},
        {"boft_block_size": 16, "boft_n_butterfly_factor": 4},  # 16 * 2^3 > 64
        {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 4},  # 4 blocks cannot take 3 doublings
    ],
)
def test_refuses_what_peft_refuses(kwargs):
    from peft import get_peft_model

    with pytest.raises(ValueError):
        get_peft_model(TwoLayer(), _peft_config(**kwargs))
    with pytest.raises(ValueError):
        qft.add_adapters(TwoLayer(), qft.BOFTConfig(target_modules=TARGETS, **kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [{"boft_block_size": 0}, {"boft_block_size": 4, "boft_block_num": 4}, {"boft_n_butterfly_factor": 0}],
)
def test_config_checks(kwargs):
    with pytest.raises(ValueError):
        BOFTConfig(**kwargs)
    with pytest.raises(ValueError, match="boft_dropout"):
        BOFTConfig(boft_dropout=1.0)


def test_permutations_refuse_what_does_not_tile():
    assert butterfly_perms(64, 16, 4, 2).shape == (2, 64)
    with pytest.raises(ValueError, match="do not tile"):
        butterfly_perms(64, 8, 4, 2)  # 8 x 4 != 64
    with pytest.raises(ValueError, match="do not tile"):
        butterfly_perms(48, 6, 8, 3)  # groups of 32 do not divide 48
