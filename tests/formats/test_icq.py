"""ICQ (qft.formats.icq): the offset (code books) or range (affine) of most code entropy, checked by brute
force over the same candidates; the ``_icq`` variants decoded ``(code[q] - zero) * scale``; method
``"icq"`` naming the stored format."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import qft
from qft import formats
from qft.formats import icq
from qft.formats.affine import icq_range


def _blocks(seed=0, blocks=24, size=64):
    """Blocks of different shapes: centred, shifted off zero, skewed, heavy-tailed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(blocks, size, generator=g)
    x[4:8] += 0.8
    x[8:12] = torch.exp(x[8:12])  # skewed
    x[12:16] = torch.randn(4, size, generator=g) ** 3  # heavy tails
    return x * 0.03


def _entropy(codes) -> float:
    counts = Counter(codes.tolist())
    return -sum(c / len(codes) * math.log2(c / len(codes)) for c in counts.values())


@pytest.mark.parametrize("fmt", ["nf4_icq", "lloyd3_icq", "lloyd2_icq"])
def test_the_offset_has_the_most_code_entropy_of_all_candidates(fmt):
    spec = formats.get_format(fmt)
    x = _blocks()
    valid = torch.ones_like(x, dtype=torch.bool)
    _, tau = spec.search(x, valid)
    table = formats.code(fmt).double()
    for b in range(x.shape[0]):
        row = x[b]
        median = row.median()
        spread = (row - median).abs().max().clamp(min=formats.ABSMAX_FLOOR)
        fraction = 1.0
        if hasattr(spec.base, "search_scale"):
            fraction = min(float(spec.base.search_scale((row - median)[None])[0] / spread), 1.0)
        found = []
        for f in torch.linspace(-icq.ICQ_RANGE * icq.SIGMA, icq.ICQ_RANGE * icq.SIGMA, 2 * icq.ICQ_STEPS + 1).tolist():
            t = median + f * spread
            s = ((row - t).abs().max() * fraction).clamp(min=formats.ABSMAX_FLOOR)
            codes = spec.encode(((row - t) / s).clamp(-1, 1))
            error = float(((table[codes.long()] * s.double() - (row - t).double()) ** 2).sum())
            found.append((_entropy(codes), error, float(t)))
        best = max(e for e, _, _ in found)
        chosen = [c for c in found if abs(c[2] - float(tau[b])) < 1e-12]
        assert chosen, f"block {b}: tau {float(tau[b])} is not a candidate"
        assert chosen[0][0] == pytest.approx(best, abs=1e-9), f"block {b}"
        ties = [err for e, err, _ in found if abs(e - best) <= 1e-9]
        assert chosen[0][1] == pytest.approx(min(ties), rel=1e-9), f"block {b}: not the least error among ties"


@pytest.mark.parametrize("fmt", ["int3", "int2"])
def test_the_affine_range_has_the_most_code_entropy_of_all_candidates(fmt):
    max_code = formats.get_format(fmt).max_code
    x = _blocks(seed=1, size=32)
    valid = torch.ones_like(x, dtype=torch.bool)
    scale, zero = icq_range(x, valid, max_code)
    for b in range(x.shape[0]):
        lo, hi = x[b].min(), x[b].max()
        best, mine = -1.0, None
        for p in [1.0, *torch.linspace(1 - icq.ICQ_RANGE, 1 + icq.ICQ_RANGE, 2 * icq.ICQ_STEPS + 1).tolist()]:
            s = (hi - lo) * p / max_code
            s = s if s > 0 else torch.tensor(1.0)
            z = -lo * p / s
            q = torch.round(x[b] / s + z).clamp(0, max_code)
            best = max(best, _entropy(q))
            if torch.isclose(s, scale[b], rtol=1e-6) and torch.isclose(z, zero[b], rtol=1e-5, atol=1e-5):
                mine = _entropy(q)
        assert mine is not None and mine == pytest.approx(best, abs=1e-9), f"block {b}"


def test_icq_raises_code_entropy_over_its_base_and_decodes_with_its_zeros():
    w = _blocks(seed=2, blocks=64).reshape(32, 128)
    plain = qft.quantize(w, "nf4", 64, double_quant=False)
    shifted = qft.quantize(w, "nf4", 64, double_quant=False, method="icq")
    assert shifted.format == "nf4_icq" and shifted.zeros.dtype == torch.float16

    def mean_entropy(qt):
        codes = formats.packing.unpack(qt.codes, 4, w.numel()).view(-1, 64)
        return sum(_entropy(row) for row in codes) / codes.shape[0]

    assert mean_entropy(shifted) > mean_entropy(plain) + 0.01
    codes = formats.packing.unpack(shifted.codes, 4, w.numel()).view(-1, 64).long()
    want = (formats.code("nf4")[codes] - shifted.zeros.float()[:, None]) * shifted.scales[:, None]
    assert torch.isfinite(want).all()
    assert torch.equal(shifted.dequantize(torch.float32).reshape(-1), want.reshape(-1))
    # bits: the base's plus 16 per block
    assert shifted.bits_per_param == pytest.approx(plain.bits_per_param + 16 / 64)


def test_method_icq_names_the_stored_format_and_refuses_code_books_without_a_variant():
    w = torch.randn(16, 64)
    assert qft.quantize(w, "lloyd2", 64, method="icq").format == "lloyd2_icq"
    assert qft.quantize(w, "int2", 64, method="icq").format == "int2"
    assert qft.quantize(w, "nf4_icq", 64).format == "nf4_icq"
    with pytest.raises(ValueError, match="method 'icq' takes an affine format"):
        qft.quantize(w, "fp4", 64, method="icq")
    with pytest.raises(ValueError, match="method 'icq' takes an affine format"):
        qft.QuantConfig("nf2", 64, method="icq")
    layer = qft.nn.QuantLinear.from_linear(torch.nn.Linear(64, 16), qft.QuantConfig("nf4", 64, method="icq"))
    assert layer.quantized.format == "nf4_icq"


def test_an_icq_weight_is_not_a_bitsandbytes_weight():
    qt = qft.quantize(torch.randn(8, 64), "nf4_icq", 64)
    with pytest.raises(ValueError, match="bitsandbytes"):
        qt.to_bnb()


@pytest.mark.parametrize("fmt", ["nf4_icq", "lloyd3_icq", "lloyd2_icq", "int2"])
def test_a_partial_block_is_searched_on_its_values_alone(fmt):
    """A block of 16 real values and 48 padding zeros gets the offset (range) its 16 values repeated 4
    times get: padding moves neither the median, the range, nor the code counts."""
    values = torch.randn(16, generator=torch.Generator().manual_seed(3)) * 0.02 + 0.05  # far from 0
    padded = torch.cat([values, torch.zeros(48)])[None]
    valid = (torch.arange(64) < 16)[None]
    repeated = values.repeat(4)[None]
    spec = formats.get_format(fmt)
    if spec.affine:
        got, want = icq_range(padded, valid, spec.max_code), icq_range(repeated, torch.ones_like(valid), spec.max_code)
    else:
        got, want = spec.search(padded, valid), spec.search(repeated, torch.ones_like(valid))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt", ["nf4_icq", "lloyd3_icq", "lloyd2_icq"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_constant_and_nearly_constant_blocks_keep_no_offset_and_decode_accurately(fmt, double_quant):
    """An offset of the whole block would be thousands of scales: its fp16 zero would overflow (a
    constant block) or round by more than the code spacing, so such blocks keep tau = 0."""
    g = torch.Generator().manual_seed(4)
    w = torch.cat(
        [
            torch.full((64,), 0.5),  # constant
            3.0 + 1e-3 * torch.rand(64, generator=g),  # nearly constant, far from zero
            torch.zeros(64),
            0.03 * torch.randn(64, generator=g),  # an ordinary block beside them
        ]
    )
    qt = qft.quantize(w, fmt, 64, double_quant=double_quant)
    got = qt.dequantize(torch.float32)
    assert torch.isfinite(qt.zeros.float()).all() and torch.isfinite(got).all()
    assert torch.equal(qt.zeros[:2].float(), torch.zeros(2))
    # the base code book's own error on those blocks (up to the nested scales' rounding, which the other
    # blocks' scales move)
    base = qft.quantize(w, formats.get_format(fmt).base.name, 64, double_quant=double_quant).dequantize(torch.float32)
    for block in range(3):
        part = slice(64 * block, 64 * block + 64)
        assert (got[part] - w[part]).abs().max() <= 1.02 * (base[part] - w[part]).abs().max() + 1e-6
