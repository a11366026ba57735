"""Byte-exactness with bitsandbytes 0.50.2's CPU path (the oracle on a machine without a GPU)."""

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from cases import DTYPES, SHAPES, edge_weight, ref_quantize

import qft
from qft import formats


def _bnb_dequantize(packed, state):
    # bitsandbytes' AVX-512 CPU dequantize mixes up row absmax when in % block != 0 and
    # in % 16 == 0 (REFERENCE.md); one flat row avoids the bug without changing its arithmetic.
    shape = state.shape
    if len(shape) > 1 and shape[-1] % state.blocksize and shape[-1] % 16 == 0:
        state.shape = torch.Size([shape.numel()])
        out = bnb_functional.dequantize_4bit(packed, state).view(shape)
        state.shape = shape
        return out
    return bnb_functional.dequantize_4bit(packed, state)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", formats.BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_bytes_and_absmax_equal_bitsandbytes(fmt, block_size, dtype):
    for shape in SHAPES:
        w = edge_weight(shape, dtype, block_size)
        packed, state = bnb_functional.quantize_4bit(w, blocksize=block_size, quant_type=fmt)
        ours, absmax = ref_quantize(w, block_size, fmt)
        assert torch.equal(ours, packed.view(-1)), (shape, "packed bytes differ")
        assert torch.equal(absmax, state.absmax), (shape, "absmax differs")


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_from_bnb_dequantizes_bit_for_bit(fmt, dtype, double_quant):
    for shape in [*SHAPES, (64, 96), (128, 4096 + 64)]:
        w = edge_weight(shape, dtype, 64)
        packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=fmt, compress_statistics=double_quant)
        qt = qft.QuantizedTensor.from_bnb(packed, state)
        assert qt.double_quant == double_quant
        ours, theirs = qt.dequantize(), _bnb_dequantize(packed, state)
        if dtype == torch.bfloat16:
            # bitsandbytes' AVX-512 bf16 conversion flushes subnormal results to zero; qft rounds them
            # like torch does. Everywhere else the two must agree bit for bit.
            flushed = (ours.abs() < torch.finfo(dtype).tiny) & (theirs == 0)
            ours, theirs = ours[~flushed], theirs[~flushed]
        assert torch.equal(ours, theirs), shape


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_to_bnb_round_trips_through_bitsandbytes(fmt):
    w = torch.randn(96, 200, dtype=torch.bfloat16)
    qt = qft.quantize(w, fmt, block_size=128)
    packed, state = qt.to_bnb()
    assert isinstance(state, bnb_functional.QuantState)
    assert packed.shape == (w.numel() // 2, 1)
    assert torch.equal(bnb_functional.dequantize_4bit(packed, state), qt.dequantize())
    back = qft.QuantizedTensor.from_bnb(packed, state)
    assert torch.equal(back.packed, qt.packed) and torch.equal(back.absmax, qt.absmax)


def test_fp4_decodes_bitsandbytes_signed_zero_codes():
    # 0 < s <= 0.0026 takes bitsandbytes' -0.0 code (8) on CPU; qft follows and decodes it to zero.
    w = torch.tensor([1.0, 0.001, -0.001, 0.0])
    packed, _ = bnb_functional.quantize_4bit(w, blocksize=32, quant_type="fp4")
    ours, _ = ref_quantize(w, 32, "fp4")
    assert torch.equal(ours, packed.view(-1))
    assert ours.tolist() == [0x38, 0x00]
    assert qft.quantize(w, "fp4", 32, double_quant=False).dequantize()[1:].abs().max() == 0


def test_all_zero_block_packs_as_zero_codes():
    packed, absmax = ref_quantize(torch.zeros(64), 64, "nf4")
    assert set(packed.tolist()) == {0x77} and absmax.item() == 0


def test_double_quant_offset_and_codes_match_or_beat_bitsandbytes():
    w = torch.randn(1024, 1024)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    qt = qft.quantize(w, "nf4", 64, double_quant=True)
    assert torch.equal(qt.packed, packed.view(-1))
    assert torch.equal(qt.offset, state.offset), "offset = mean(absmax) must be identical"
    assert torch.equal(qt.nested_absmax, state.state2.absmax)
    _, absmax = ref_quantize(w, 64, "nf4")
    target = (absmax - state.offset).double().view(-1, 256) / state.state2.absmax.double().view(-1, 1)
    dmap = formats.dynamic_map().double()
    ours = (dmap[qt.absmax.long()].view(-1, 256) - target).abs()
    theirs = (dmap[state.absmax.long()].view(-1, 256) - target).abs()
    assert bool((ours <= theirs).all()), "a qft nested code is farther from the value than bitsandbytes'"
    bnb_nearest = theirs <= ours
    assert torch.equal(qt.absmax.view(-1, 256)[bnb_nearest], state.absmax.view(-1, 256)[bnb_nearest])
    # bitsandbytes' CPU lookup table is only approximately nearest: some codes must differ.
    assert int((qt.absmax != state.absmax).sum()) > 0


@pytest.mark.parametrize("double_quant,expected", [(True, 4.127), (False, 4.5)])
def test_bits_per_param_at_block_64(double_quant, expected):
    qt = qft.quantize(torch.randn(4096, 4096), "nf4", 64, double_quant=double_quant)
    assert qt.bits_per_param == pytest.approx(expected, abs=5e-4)


def test_the_documented_differences_from_bitsandbytes_are_the_only_ones():
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    qt = qft.quantize(w, "nf4", 64, True)
    assert torch.equal(qt.packed, packed.reshape(-1)) and torch.equal(qt.nested_absmax, state.state2.absmax)
    assert float(qt.offset) == float(state.offset)
    differ = (qt.absmax != state.absmax).float().mean().item()
    assert 0 < differ < 0.005  # (1) nearest 8-bit scale codes: README says 0.2%
    ones = torch.ones(64 * 512)
    packed, state = bnb_functional.quantize_4bit(ones, blocksize=64, quant_type="nf4", compress_statistics=True)
    qt = qft.quantize(ones, "nf4", 64, True)
    assert qt.absmax.unique().tolist() == [127] and state.absmax.unique().tolist() == [0]  # (2)
    assert torch.equal(qt.dequantize(torch.float32), bnb_functional.dequantize_4bit(packed, state).reshape(-1))
    tail = torch.randn(64 * 4 + 16)
    tail[-16:] = 0
    packed, state = bnb_functional.quantize_4bit(tail, blocksize=64, quant_type="fp4")
    qt = qft.quantize(tail, "fp4", 64, False)
    assert torch.equal(qt.packed, packed.reshape(-1)) and torch.equal(qt.absmax[:-1], state.absmax[:-1])
    assert qt.absmax[-1] == 0 and state.absmax[-1] > 0  # (3) the true absmax of an all-zero tail
