"""Importers: HQQ layers (the hqq package, CPU) and GPTQ tensors packed here by GPTQ's layout."""

import pytest
import torch

from qft import interop


def _pack_gptq_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's packing along dim 0 (written from its documented layout, independently of qft)."""
    rows, cols = values.shape
    v = values.to(torch.int64)
    if bits in (4, 2):
        per = 32 // bits
        v = v.view(rows // per, per, cols)
        words = sum(v[:, i] << (bits * i) for i in range(per))
    else:
        v = v.view(rows // 32, 32, cols)
        w0 = sum(v[:, i] << (3 * i) for i in range(10)) | ((v[:, 10] & 3) << 30)
        w1 = (v[:, 10] >> 2) | sum(v[:, 11 + i] << (3 * i + 1) for i in range(10)) | ((v[:, 21] & 1) << 31)
        w2 = (v[:, 21] >> 1) | sum(v[:, 22 + i] << (3 * i + 2) for i in range(10))
        words = torch.stack([w0, w1, w2], 1).reshape(-1, cols)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("group_size", [32, 64])
def test_gptq_import_decodes_gptq_formula(bits, group_size):
    torch.manual_seed(0)
    k, n = 128, 96
    groups = k // group_size
    q = torch.randint(0, 2**bits, (k, n))
    zeros_minus_one = torch.randint(0, 2**bits - 1, (groups, n))
    scales = (torch.rand(groups, n) * 0.1 + 0.01).half()
    qweight = _pack_gptq_rows(q, bits)
    qzeros = _pack_gptq_rows(zeros_minus_one.t().contiguous(), bits).t().contiguous()
    g_idx = torch.arange(k) // group_size
    qt, perm = interop.from_gptq(qweight, qzeros, scales, bits, group_size, g_idx)
    assert perm is None and qt.shape == (n, k) and qt.format == f"int{bits}"
    g = torch.arange(k) // group_size
    want = ((q - (zeros_minus_one[g] + 1)) * scales[g].float()).t().half()  # W[n, k]
    assert torch.equal(qt.dequantize(torch.float16), want)


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_act_order_import_computes_the_gptq_layer(bits):
    import qft

    torch.manual_seed(0)
    k, n, group_size = 128, 64, 32
    groups = k // group_size
    g_idx = torch.randperm(k) // group_size  # act-order: each group's channels spread over the row
    q = torch.randint(0, 2**bits, (k, n))
    zeros_minus_one = torch.randint(0, 2**bits - 1, (groups, n))
    scales = (torch.rand(groups, n) * 0.1 + 0.01).half()
    qzeros = _pack_gptq_rows(zeros_minus_one.t().contiguous(), bits).t().contiguous()
    qt, perm = interop.from_gptq(_pack_gptq_rows(q, bits), qzeros, scales, bits, group_size, g_idx)
    assert perm is not None
    want = ((q - (zeros_minus_one[g_idx] + 1)) * scales[g_idx].float()).t()  # W[n, k], GPTQ's formula, fp32
    layer = qft.nn.QuantLinear(qt, input_perm=perm)
    assert torch.equal(layer.dequantize(torch.float16), want.half())
    x = torch.randn(3, k)
    torch.testing.assert_close(layer(x), x @ want.t(), rtol=1e-5, atol=1e-4)
    qft_model = torch.nn.Sequential(layer)
    qft.add_adapters(qft_model, qft.LoRAConfig(r=4, target_modules=("0",)))
    torch.nn.init.normal_(qft_model[0].lora_B.weight)
    a, b = qft_model[0].lora_A.weight, qft_model[0].lora_B.weight
    want_y = x @ want.t() + qft_model[0].scaling * (x @ a.t()) @ b.t()
    torch.testing.assert_close(qft_model(x), want_y, rtol=1e-5, atol=1e-4)


def test_gptq_g_idx_with_uneven_groups_is_refused():
    qweight = _pack_gptq_rows(torch.zeros(64, 32, dtype=torch.int64), 4)
    qzeros = torch.zeros(2, 4, dtype=torch.int32)
    g_idx = torch.zeros(64, dtype=torch.int64)
    g_idx[0] = 1
    with pytest.raises(ValueError, match="must hold 32 input channels"):
        interop.from_gptq(qweight, qzeros, torch.ones(2, 32).half(), 4, 32, g_idx)


@pytest.mark.parametrize("nbits", [4, 3, 2])
def test_hqq_import_matches_hqq_dequantize(nbits):
    hqq_quantize = pytest.importorskip("hqq.core.quantize")
    torch.manual_seed(0)
    layer = hqq_quantize.HQQLinear(
        torch.nn.Linear(128, 64),
        hqq_quantize.BaseQuantizeConfig(nbits=nbits, group_size=64, axis=1),
        compute_dtype=torch.float16,
        device="cpu",
    )
    qt = interop.from_hqq(layer)
    theirs = layer.dequantize()
    ours = qt.dequantize(torch.float16)
    assert ours.shape == theirs.shape == (64, 128)
    # HQQ subtracts in fp16; where q - zero is exact in fp16 both round the same product once.
    exact = (ours == theirs).float().mean()
    assert exact > 0.99
    torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=1e-3)
