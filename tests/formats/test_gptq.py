"""GPTQ-style error feedback (``qft.formats.gptq``): equal to a straightforward float64 GPTQ written
here column by column, better than plain rounding on the calibration inputs' outputs, and an ordinary
weight of its format (scales as the plain method's, codes decoded by every path)."""

import pytest
import torch

import qft
from qft import formats
from qft.formats.gptq import gptq_quantize, inverse_hessian_factor

FORMATS = ["nf4", "int3", "lloyd2", "int2", "nf4_icq", "lloyd2_icq"]


def _layer(n=24, k=192, rows=256, seed=0):  # k > gptq.LAZY_COLUMNS: two lazy blocks, one partial
    """W [n, k] and correlated inputs X [rows, k] (a random mixing of few directions, as activations)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(rows, 16, generator=g) @ torch.randn(16, k, generator=g) + 0.1 * torch.randn(rows, k, generator=g)
    x[:, 5] = 0  # a dead input: GPTQ's special case
    return w, x, x.t() @ x / rows


def _reference_codes(w, h, fmt, block_size, act_order):
    """GPTQ as the paper's Algorithm 1 without lazy batches, in float64, rounding by nearest grid value."""
    weight = formats.quantize(w, fmt, block_size, "hqq", True)
    n, k = w.shape
    scales = formats.decoded_scales(weight).double().view(n, -1)
    form = formats.get_format(fmt)
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k)
    u, dead = inverse_hessian_factor(h.double()[order][:, order])
    work = w.double()[:, order].clone()
    work[:, dead] = 0
    codes = torch.zeros(n, k, dtype=torch.long)
    for j in range(k):
        g, col = int(order[j]) // block_size, work[:, j]
        if form.affine:
            zeros = weight.zeros.double().view(n, -1)[:, g]
            c = torch.round(col / scales[:, g] + zeros).clamp(0, form.max_code)
            value = (c - zeros) * scales[:, g]
        else:  # the nearest value of the code book (ties never happen with random data)
            zero = weight.zeros.double().view(n, -1)[:, g, None] if form.stores_zeros else 0.0
            grid = (formats.code(fmt).double()[None, :] - zero) * scales[:, g, None]
            inside = torch.minimum(torch.maximum(col, grid.amin(1)), grid.amax(1))
            c = (grid - inside[:, None]).abs().argmin(1)
            value = grid[torch.arange(n), c]
        codes[:, order[j]] = c.long()
        error = (col - value) / u[j, j]
        work[:, j:] -= error[:, None] * u[j, j:][None, :]
    return codes


def _codes(weight, fmt):
    return formats.packing.unpack(weight.codes, formats.get_format(fmt).bits, weight.numel).long()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act_order", [False, True])
def test_equals_a_float64_reference(fmt, act_order):
    w, _, h = _layer()
    block = 32 if fmt.startswith("int") else 64
    weight = gptq_quantize(w, h.double(), fmt, block, nested=True, act_order=act_order, dtype=torch.float64)
    want = _reference_codes(w, h, fmt, block, act_order)
    got = _codes(weight, fmt).view(w.shape)
    assert torch.equal(got, want)
    plain = formats.quantize(w, fmt, block, "hqq", True)  # the same static scales, double-quantized
    assert all(torch.equal(weight.parts[p], plain.parts[p]) for p in plain.parts if p != "codes")


@pytest.mark.parametrize("fmt", FORMATS)
def test_lowers_the_output_error_on_the_calibration_inputs(fmt):
    w, x, h = _layer(seed=1)
    block = 32 if fmt.startswith("int") else 64
    plain = qft.quantize(w, fmt, block)
    gptq = qft.quantize(w, fmt, block, method="gptq", hessian=h)
    err_plain = (x @ (plain.dequantize(torch.float32) - w).t()).norm()
    err_gptq = (x @ (gptq.dequantize(torch.float32) - w).t()).norm()
    assert err_gptq < 0.8 * err_plain, (err_gptq, err_plain)
    fp32 = gptq_quantize(w, h, fmt, block, nested=True)  # the fp32 working precision decides as fp64 nearly always
    fp64 = gptq_quantize(w, h.double(), fmt, block, nested=True, dtype=torch.float64)
    assert (_codes(fp32, fmt) == _codes(fp64, fmt)).float().mean() > 0.99


def test_refuses_what_it_cannot_do():
    w, _, h = _layer()
    with pytest.raises(ValueError, match="needs a hessian"):
        qft.quantize(w, "int3", 32, method="gptq")
    with pytest.raises(ValueError, match="needs a hessian"):
        qft.quantize(w, "int3", 32, hessian=h)
    with pytest.raises(ValueError, match=r"\[192, 192\]"):
        qft.quantize(w, "int3", 32, method="gptq", hessian=h[:64, :64])
    with pytest.raises(ValueError, match="divide"):
        qft.quantize(w[:, :96], "nf4", 64, method="gptq", hessian=h[:96, :96])
    with pytest.raises(ValueError, match="2-D"):
        qft.quantize(w.reshape(-1), "int3", 32, method="gptq", hessian=h)
