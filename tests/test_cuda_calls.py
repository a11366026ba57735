"""Call contracts of qft._C: the dispatcher's own CUDA paths, called on CPU tensors with nothing to do.

Each path prepares its arguments exactly as it does on a GPU and reaches the extension through
``qft.ops.cuda_calls``; the extension refuses an empty problem before any launch, so the answer must
be its own ``RuntimeError``. A ``TypeError`` (argument count or kinds drifted from
``csrc/bindings.cpp``) or a ``ValueError`` from the Python side (a table the format lacks) fails here,
on a machine without a GPU, where it would otherwise first show on the GPU.
"""

import pytest
import torch

import qft
from qft import formats
from qft._extension import extension
from qft.ops import cuda_calls
from qft.ops.linear import _gemv_cuda
from qft.ops.quant import _dequantize_4bit_cuda, _dequantize_lowbit_cuda, _quantize_4bit_cuda

pytestmark = pytest.mark.skipif(extension().module is None, reason="qft._C not built (no nvcc)")

FORMATS = sorted(formats.FORMATS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REFUSED = "qft CUDA kernel failed"


def _weight(fmt: str, double_quant: bool) -> qft.QuantizedTensor:
    return qft.quantize(torch.randn(32, 64), fmt, 64, double_quant)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("extras", ["plain", "bias+lora"])
def test_quant_gemv_contract(fmt, dtype, double_quant, extras):
    qt = _weight(fmt, double_quant)
    n, k = qt.shape
    x = torch.empty(0, k, dtype=dtype)  # zero rows: refused before any launch
    bias = xa = lora_b = None
    if extras != "plain":
        bias, xa, lora_b = torch.zeros(n, dtype=dtype), torch.zeros(0, 8), torch.zeros(n, 8)
    parts = (qt.packed, qt.absmax, qt.nested_absmax, qt.offset, qt.zero, qt.block_size, fmt, n, qt.nested_block_size)
    with pytest.raises(RuntimeError, match=REFUSED):
        _gemv_cuda(x, *parts, bias, xa, lora_b, 2.0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_contract(fmt, dtype, double_quant):
    qt = _weight(fmt, double_quant)
    parts = (qt.packed, qt.absmax, qt.nested_absmax, qt.offset)
    with pytest.raises(RuntimeError, match=REFUSED):
        if formats.is_4bit_codebook(fmt):
            _dequantize_4bit_cuda(*parts, qt.block_size, fmt, 0, dtype, qt.nested_block_size)
        else:
            _dequantize_lowbit_cuda(*parts, qt.zero, qt.block_size, fmt, 0, dtype, qt.nested_block_size, None)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_4bit_contract(fmt, dtype):
    with pytest.raises(RuntimeError, match=REFUSED):
        _quantize_4bit_cuda(torch.empty(0, dtype=dtype), 64, fmt)


def test_max_gemv_rows_is_the_extensions():
    assert cuda_calls.max_gemv_rows() == extension().module.max_gemv_rows >= 1


@pytest.mark.skipif(extension().device_count > 0, reason="without a GPU only: here the calls would succeed")
def test_managed_memory_contracts_without_gpu():
    with pytest.raises(RuntimeError, match=REFUSED):
        cuda_calls.managed_alloc(1024)
    with pytest.raises(RuntimeError, match=REFUSED):
        cuda_calls.managed_prefetch(0, 0, -1, 0)
