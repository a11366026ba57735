"""Property tests: random shapes, block sizes, formats and dtypes against the reference."""

import bitsandbytes.functional as bnb_functional
import torch
from cases import ref_dequantize, ref_quantize, weight
from hypothesis import given, settings
from hypothesis import strategies as st

import qft
from qft import formats
from qft.kernels.dequantize_codebook4 import dequantize_codebook4 as triton_dequantize
from qft.kernels.quantize_codebook4 import quantize_codebook4 as triton_quantize

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
FORMATS = st.sampled_from(["nf4", "fp4"])
BLOCKS = st.sampled_from(formats.BLOCK_SIZES)
SHAPES = st.lists(st.integers(1, 70), min_size=1, max_size=3)


def _weight(shape, dtype, seed, scale_exp):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2.0**scale_exp).to(dtype)


@settings(max_examples=40, deadline=None)
@given(shape=SHAPES, dtype=DTYPES, fmt=FORMATS, block_size=BLOCKS, seed=st.integers(0, 2**31), e=st.integers(-8, 8))
def test_reference_equals_bitsandbytes(shape, dtype, fmt, block_size, seed, e):
    w = _weight(shape, dtype, seed, e)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=block_size, quant_type=fmt)
    ours, absmax = ref_quantize(w, block_size, fmt)
    assert torch.equal(ours, packed.view(-1)) and torch.equal(absmax, state.absmax)


@settings(max_examples=25, deadline=None)
@given(shape=SHAPES, dtype=DTYPES, fmt=FORMATS, block_size=BLOCKS, seed=st.integers(0, 2**31), nested=st.booleans())
def test_triton_equals_reference(shape, dtype, fmt, block_size, seed, nested):
    w = _weight(shape, dtype, seed, 0)
    packed, absmax = ref_quantize(w, block_size, fmt)
    got_packed, got_absmax = triton_quantize(w, block_size, fmt)
    assert torch.equal(got_packed, packed) and torch.equal(got_absmax, absmax)
    n = w.numel()
    if nested:
        codes, absmax2, offset = formats.double_quant.quantize(absmax)
        want = ref_dequantize(
            packed, formats.double_quant.dequantize(codes, absmax2, offset), block_size, fmt, n, dtype
        )
        got = triton_dequantize(weight(packed, codes, block_size, fmt, n, absmax2, offset), dtype)
    else:
        want = ref_dequantize(packed, absmax, block_size, fmt, n, dtype)
        got = triton_dequantize(weight(packed, absmax, block_size, fmt, n), dtype)
    assert torch.equal(got, want)


@settings(max_examples=40, deadline=None)
@given(shape=SHAPES, fmt=FORMATS, block_size=BLOCKS, seed=st.integers(0, 2**31), e=st.integers(-20, 20))
def test_decode_error_within_half_code_gap(shape, fmt, block_size, seed, e):
    w = _weight(shape, torch.float32, seed, e)
    qt = qft.quantize(w, fmt, block_size, double_quant=False)
    code = formats.code(fmt).sort().values
    half_gap = ((code[1:] - code[:-1]) / 2).max()
    bound = (
        formats.packing.blocks(qt.absmax.repeat_interleave(block_size), block_size).reshape(-1)[: w.numel()] * half_gap
    )
    assert bool(((qt.dequantize() - w).abs().reshape(-1) <= bound * (1 + 1e-6)).all())
