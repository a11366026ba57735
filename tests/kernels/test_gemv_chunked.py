"""The chunked decode GEMV (csrc/gemv_core.cuh) on a machine without a GPU, through its CPU emulation.

``qft._C.quant_gemv_emulate`` runs the kernel's own functions (look-up table, shifts and masks, loads,
fmaf chains, split ranges, warp butterfly, split-K finish) on host pointers, so its index math and
arithmetic are checked here against the exact product of the decoded weight; on a GPU the kernel must
match the emulation bit for bit.

The bound: the chunked kernel sums fp32 code values times x and scales once per block, so its error is
fp32 accumulation (a few ulps of fp32 of sum |x| |w|) plus the one rounding of y to x's dtype.
"""

import pytest
import torch

from qft import formats
from qft._extension import extension
from qft.ops import cuda_calls, thresholds

pytestmark = pytest.mark.skipif(extension().module is None, reason="qft._C not built (no nvcc)")

FORMATS = sorted(formats.FORMATS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Half an ulp of the output dtype, relative (fp32 y is not rounded past the fp32 sums).
OUTPUT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
FP32_SUMS = 2e-6  # of sum |terms|: K = 320 products at 2**-24 each, with margin


def _problem(fmt, dtype, double_quant, m, n=37, k=320, block_size=64, extras=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = formats.quantize(torch.randn(n, k, generator=g), fmt, block_size, nested=double_quant)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if extras else None
    xa = torch.randn(m, 8, generator=g) if extras else None
    lora_b = torch.randn(n, 8, generator=g) if extras else None
    return weight, x, bias, xa, lora_b


def _emulate(weight, x, bias, xa, lora_b, splits=1, scaling=0.5):
    y = torch.empty(x.shape[0], weight.numel // x.shape[1], dtype=x.dtype)
    workspace = torch.empty(splits * y.numel()) if splits > 1 else None
    cuda_calls.quant_gemv_emulate(x, weight, bias, xa, lora_b, scaling, y, workspace)
    return y


def _check_close(y, weight, x, bias, xa, lora_b, scaling=0.5):
    w = formats.dequantize(weight, torch.float32).view(y.shape[1], -1).double()
    terms = [x.double() @ w.t()]
    bounds = [x.double().abs() @ w.abs().t()]
    if bias is not None:
        terms.append(bias.double().expand_as(terms[0]))
        bounds.append(bias.double().abs().expand_as(terms[0]))
    if xa is not None:
        terms.append(scaling * xa.double() @ lora_b.double().t())
        bounds.append(scaling * xa.double().abs() @ lora_b.double().abs().t())
    exact, bound = sum(terms), sum(bounds)
    tolerance = OUTPUT_ROUNDING[y.dtype] * exact.abs() + FP32_SUMS * bound
    worst = ((y.double() - exact).abs() - tolerance).max()
    assert worst <= 0, f"off by {worst:.3g} past the bound"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_matches_exact_product(fmt, dtype, double_quant):
    # N = 37: a CTA's last warp has rows past N; K = 320: five chunks, so most lanes have none and
    # three splits are uneven (2, 2, 1 chunks).
    for m in range(1, 5):
        for extras, splits in ((True, 1), (False, 1), (True, 3)):
            problem = _problem(fmt, dtype, double_quant, m, extras=extras, seed=m)
            y = _emulate(*problem, splits=splits)
            _check_close(y, *problem)


@pytest.mark.parametrize("fmt", ["nf4", "lloyd3", "nf2"])
@pytest.mark.parametrize("block_size", [128, 256])
def test_blocks_larger_than_a_chunk(fmt, block_size):
    problem = _problem(fmt, torch.bfloat16, True, 2, k=512, block_size=block_size)
    _check_close(_emulate(*problem, splits=2), *problem)


@pytest.mark.parametrize("fmt", ["nf4", "int3", "nf2"])
def test_many_chunks_per_lane(fmt):
    # K = 8192: 128 chunks, four per lane, and the table index runs through every byte value.
    problem = _problem(fmt, torch.bfloat16, False, 1, n=5, k=8192)
    _check_close(_emulate(*problem), *problem)


def test_splits_do_not_change_the_sum_much_and_keep_order():
    problem = _problem("nf4", torch.float32, False, 1, n=9, k=4096)
    one, four = _emulate(*problem, splits=1), _emulate(*problem, splits=4)
    torch.testing.assert_close(one, four, rtol=1e-5, atol=1e-5)
    assert torch.equal(four, _emulate(*problem, splits=4))  # deterministic: fixed summation order


@pytest.mark.parametrize(
    "change",
    ["k_not_a_block_multiple", "block_32", "x_misaligned"],
)
def test_other_shapes_are_the_per_value_kernels(change):
    k, block_size = (100, 64) if change == "k_not_a_block_multiple" else (320, 32 if change == "block_32" else 64)
    weight, x, bias, xa, lora_b = _problem("nf4", torch.float32, False, 1, k=k, block_size=block_size)
    if change == "x_misaligned":
        x = torch.randn(k + 1)[1:].view(1, k)  # 4 bytes past an aligned start
    with pytest.raises(RuntimeError, match="not supported"):
        _emulate(weight, x, bias, xa, lora_b)


@pytest.mark.parametrize("rows", [0, 5])
def test_refuses_rows_outside_the_kernel(rows):
    weight, _, _, _, _ = _problem("nf4", torch.float32, False, 1)
    with pytest.raises(RuntimeError, match="qft CUDA kernel failed"):
        _emulate(weight, torch.randn(rows, 320), None, None, None)


def test_refuses_more_splits_than_chunks():
    problem = _problem("nf4", torch.float32, False, 1)  # K = 320: five chunks
    with pytest.raises(RuntimeError, match="qft CUDA kernel failed"):
        _emulate(*problem, splits=6)


def test_split_rule(monkeypatch):
    monkeypatch.setattr(thresholds, "device_facts", lambda index: ("sm90", 132))
    gpu = torch.device("cuda", 0)
    assert thresholds.gemv_splits(torch.device("cpu"), 1024, 8192) == 1
    assert thresholds.gemv_splits(gpu, 28672, 8192) == 1  # 7168 warps fill 132 x 16 slots
    assert thresholds.gemv_splits(gpu, 1024, 8192) == 4  # 256 warps: 2112 slots would take 9, K allows 4
    assert thresholds.gemv_splits(gpu, 4096, 28672) == 3  # 1024 warps: 3 fill the slots
    assert thresholds.gemv_splits(gpu, 1024, 2048) == 1  # one chunk per lane already


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_gpu_kernel_equals_emulation_bit_for_bit(fmt, dtype, double_quant):
    from qft.ops.dispatch import cuda_stream

    for m in range(1, 5):
        for splits in (1, 3):
            problem = _problem(fmt, dtype, double_quant, m, n=300, k=4096, seed=m)
            want = _emulate(*problem, splits=splits)
            weight = problem[0].map(lambda t: t.cuda())
            x, bias, xa, lora_b = (None if t is None else t.cuda() for t in problem[1:])
            y = torch.empty(want.shape, dtype=dtype, device="cuda")
            workspace = torch.empty(splits * y.numel(), device="cuda") if splits > 1 else None
            cuda_calls.quant_gemv(x, weight, bias, xa, lora_b, 0.5, y, cuda_stream(x.device), workspace)
            torch.cuda.synchronize()
            assert torch.equal(y.cpu(), want), (m, splits)
