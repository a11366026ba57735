"""Call contracts of qft._C: each ``qft.ops.cuda_calls`` wrapper, called as the CUDA backend calls it, on nothing.

Each wrapper gets what the backend passes on a GPU (a ``qft.formats.Weight``, tensors, a stream),
here as CPU tensors of an empty problem; the extension refuses an empty problem before any launch,
so the answer must be its own ``RuntimeError``. A ``TypeError`` (argument names, count or kinds
drifted from ``csrc/bindings.cpp``) or a ``ValueError`` from the Python side (a table the format
lacks) fails here, on a machine without a GPU, where it would otherwise first show on the GPU.
Every format is covered: 4-bit code books (the byte-pair kernel), 3- and 2-bit code books, affine
formats, each with and without double quantization.
"""

import pytest
import torch

from qft import formats
from qft._extension import extension
from qft.ops import cuda_calls
from qft.ops.dispatch import cuda_stream

pytestmark = pytest.mark.skipif(extension().module is None, reason="qft._C not built (no nvcc)")

FORMATS = sorted(formats.FORMATS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REFUSED = "qft CUDA kernel failed"
CPU = torch.device("cpu")


def _weight(fmt: str, double_quant: bool, rows: int = 32) -> formats.Weight:
    return formats.quantize(torch.randn(rows, 64), fmt, 64, nested=double_quant)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_weight_reaches_the_extension_whole(fmt, double_quant):
    weight = _weight(fmt, double_quant)
    qw = cuda_calls._quant_weight(weight)
    spec = formats.get_format(fmt)
    for name in formats.PART_NAMES:  # each part in its own field, absent ones null
        part = weight.parts.get(name)
        assert getattr(qw, name) == (0 if part is None else part.data_ptr()), name
    assert qw.code == (0 if spec.affine else formats.code(fmt).data_ptr())
    assert qw.dynamic_map == (formats.dynamic_map().data_ptr() if double_quant else 0)
    numbers = (qw.bits, qw.affine, qw.numel, qw.block_size, qw.nested_block_size)
    assert numbers == (spec.bits, spec.affine, weight.numel, weight.block_size, weight.nested_block_size)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("extras", ["plain", "bias+lora"])
def test_quant_gemv_contract(fmt, dtype, double_quant, extras):
    weight = _weight(fmt, double_quant)
    n, k = 32, 64
    x = torch.empty(0, k, dtype=dtype)  # zero rows: refused before any launch
    y = torch.empty(0, n, dtype=dtype)
    bias = xa = lora_b = None
    if extras != "plain":
        bias, xa, lora_b = torch.zeros(n, dtype=dtype), torch.zeros(0, 8), torch.zeros(n, 8)
    with pytest.raises(RuntimeError, match=REFUSED):
        cuda_calls.quant_gemv(x, weight, bias, xa, lora_b, 2.0, y, cuda_stream(CPU))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_contract(fmt, dtype, double_quant):
    weight = _weight(fmt, double_quant, rows=0)  # no values: refused before any launch
    with pytest.raises(RuntimeError, match=REFUSED):
        cuda_calls.dequantize(weight, torch.empty(0, dtype=dtype), cuda_stream(CPU))


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_codebook4_contract(fmt, dtype):
    codes, scales = torch.empty(0, dtype=torch.uint8), torch.empty(0)
    with pytest.raises(RuntimeError, match=REFUSED):
        cuda_calls.quantize_codebook4(torch.empty(0, dtype=dtype), codes, scales, fmt, 64, cuda_stream(CPU))


@pytest.mark.parametrize("fmt", ["lloyd3", "int4"])
def test_quantize_codebook4_refuses_other_formats(fmt):
    codes, scales = torch.empty(0, dtype=torch.uint8), torch.empty(0)
    with pytest.raises(ValueError, match="bitsandbytes code book"):
        cuda_calls.quantize_codebook4(torch.empty(0), codes, scales, fmt, 64, cuda_stream(CPU))


def test_max_gemv_rows_is_the_extensions():
    assert cuda_calls.max_gemv_rows() == extension().module.max_gemv_rows >= 1


@pytest.mark.skipif(extension().device_count > 0, reason="without a GPU only: here the calls would succeed")
def test_managed_memory_contracts_without_gpu():
    with pytest.raises(RuntimeError, match=REFUSED):
        cuda_calls.managed_alloc(1024)
    with pytest.raises(RuntimeError, match=REFUSED):
        cuda_calls.managed_prefetch(0, 0, -1, 0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_gemv_emulate_contract(fmt, dtype):
    weight = _weight(fmt, False)
    x, y = torch.empty(0, 64, dtype=dtype), torch.empty(0, 32, dtype=dtype)
    with pytest.raises(RuntimeError, match=REFUSED):
        cuda_calls.quant_gemv_emulate(x, weight, None, None, None, 1.0, y)
