"""Triton kernels (CPU interpreter here; the GPU under the gpu marker) against the reference."""

import pytest
import torch
from cases import DTYPES, SHAPES, edge_weight, ref_dequantize, ref_quantize, weight

from qft import formats
from qft.kernels.dequantize_codebook4 import dequantize_codebook4 as triton_dequantize
from qft.kernels.quantize_codebook4 import quantize_codebook4 as triton_quantize


def _check_device(device, fmt, block_size, w_dtype, out_dtype):
    for shape in SHAPES:
        w = edge_weight(shape, w_dtype, block_size).to(device)
        packed, absmax = ref_quantize(w, block_size, fmt)
        got_packed, got_absmax = triton_quantize(w, block_size, fmt)
        assert torch.equal(got_packed, packed), (shape, "codes differ")
        assert torch.equal(got_absmax, absmax), (shape, "absmax differs")

        n = w.numel()
        want = ref_dequantize(packed, absmax, block_size, fmt, n, out_dtype)
        assert torch.equal(triton_dequantize(weight(packed, absmax, block_size, fmt, n), out_dtype), want), shape

        codes, absmax2, offset = formats.double_quant.quantize(absmax)
        nested = formats.double_quant.dequantize(codes, absmax2, offset)
        want = ref_dequantize(packed, nested, block_size, fmt, n, out_dtype)
        got = triton_dequantize(weight(packed, codes, block_size, fmt, n, absmax2, offset), out_dtype)
        assert torch.equal(got, want), (shape, "double-quant decode differs")


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_reference_in_interpreter(fmt, block_size, dtype):
    _check_device("cpu", fmt, block_size, dtype, dtype)


def test_triton_bf16_output_rounds_to_nearest_even():
    # 1 + 2**-8 + 2**-20 lies above the bf16 midpoint: truncation would give 1.0.
    absmax = torch.tensor([1.0 + 2**-8 + 2**-20])
    packed = torch.full((16,), 0xFF, dtype=torch.uint8)  # nf4 code 15 = 1.0
    out = triton_dequantize(weight(packed, absmax, 32, "nf4", 32), torch.bfloat16)
    assert torch.equal(out, absmax.to(torch.bfloat16).expand(32))
    assert out[0].item() != 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", [32, 64, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_reference_on_gpu(fmt, block_size, dtype):
    _check_device("cuda", fmt, block_size, dtype, dtype)
