"""3-/2-bit code books (Lloyd, NormalFloat) and affine int4/3/2: packing, quantizers, QuantizedTensor,
QLoRA over them."""

import pytest
import torch

import qft
from qft import formats
from qft.formats import packing
from qft.ops import thresholds

LOWBIT = ["lloyd3", "lloyd2", "nf3", "nf2", "int4", "int3", "int2"]


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("n", [1, 15, 16, 31, 32, 33, 100, 1000])
def test_pack_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.numel() == formats.packed_numel(n, bits)
    assert torch.equal(packing.unpack(packed, bits, n), codes.long())


def test_three_bit_layout_is_bit_planar():
    codes = torch.zeros(32, dtype=torch.uint8)
    codes[0], codes[17], codes[31] = 0b101, 0b011, 0b110
    w0, w1, w2 = (int(v) & 0xFFFFFFFF for v in packing.pack(codes, 3))
    assert w0 == 0b01  # value 0's low bits at bits 0-1
    assert w1 & 0xF == 0b11 << 2  # value 17 is the second of word 1
    assert w1 >> 30 == 0b10  # value 31's low bits at the top of word 1
    assert w2 == (1 << 0) | (1 << 31)  # high bits of values 0 and 31


def test_two_bit_layout():
    codes = torch.tensor([1, 0, 0, 3] + [0] * 11 + [2], dtype=torch.uint8)
    (word,) = (int(v) & 0xFFFFFFFF for v in packing.pack(codes, 2))
    assert word == 1 | (3 << 6) | (2 << 30)


@pytest.mark.parametrize("fmt", LOWBIT)
@pytest.mark.parametrize("shape", [(7, 45), (33, 64), (5, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_dequantize_every_format(fmt, shape, dtype):
    w = torch.randn(shape).to(dtype)
    qt = qft.quantize(w, fmt, 32)
    out = qt.dequantize()
    assert out.shape == w.shape and out.dtype == dtype
    bits = formats.get_format(fmt).bits
    err = ((out.float() - w.float()).norm() / w.float().norm()).item()
    assert err < {4: 0.12, 3: 0.25, 2: 0.5}[bits]
    back = qft.QuantizedTensor.from_state_dict(qt.state_dict())
    assert torch.equal(back.dequantize(), out)


@pytest.mark.parametrize("fmt", ["int4", "int3", "int2"])
def test_affine_decode_is_q_minus_zero_times_scale(fmt):
    w = torch.randn(4, 64)
    encoded = formats.quantize(w, fmt, 32, "clip")
    codes = packing.unpack(encoded.codes, formats.get_format(fmt).bits, w.numel())
    assert int(codes.max()) <= formats.get_format(fmt).max_code
    want = (codes.float().view(-1, 32) - encoded.zeros.float().view(-1, 1)) * encoded.scales.view(-1, 1)
    assert torch.equal(formats.dequantize(encoded, torch.float32), want.view(-1))


@pytest.mark.parametrize("fmt", ["int3", "int2"])
def test_clip_and_hqq_improve_on_min_max(fmt):
    w = torch.randn(64, 256)

    def err(method):
        return (formats.dequantize(formats.quantize(w, fmt, 64, method), torch.float32).view_as(w) - w).norm()

    assert err("hqq") < err("clip") < err("rtn")


@pytest.mark.parametrize("fmt", ["lloyd2", "nf3", "nf2"])
def test_code_book_scale_search_never_hurts(fmt):
    w = torch.randn(64, 256)
    encoded = formats.quantize(w, fmt, 64)
    absmax = w.view(-1, 64).abs().amax(1)
    assert bool((encoded.scales <= absmax).all())
    searched = (formats.dequantize(encoded, torch.float32).view_as(w) - w).norm()
    plain = formats.bnb_codebooks.scale_to_unit(w, absmax, 64)
    codes = torch.bucketize(plain.reshape(-1), formats.thresholds(fmt))
    unsearched = (formats.get_format(fmt).dequantize(codes, absmax, 64, torch.float32).view_as(w) - w).norm()
    assert searched <= unsearched


def test_beats_hqq_at_lower_bits():
    hqq_quantize = pytest.importorskip("hqq.core.quantize")
    w = torch.randn(512, 1024)
    for bits, fmt, goal in ((3, "int3", 0.97), (2, "int2", 0.85), (3, "lloyd3", 0.97), (2, "lloyd2", 0.85)):
        wq, meta = hqq_quantize.Quantizer.quantize(
            w, nbits=bits, group_size=64, axis=1, device="cpu", compute_dtype=torch.float32
        )
        theirs = (hqq_quantize.Quantizer.dequantize(wq, meta).reshape(w.shape) - w).norm() / w.norm()
        qt = qft.quantize(w, fmt, 64)
        ours = (qt.dequantize() - w).norm() / w.norm()
        assert qt.bits_per_param < bits + 0.5, "HQQ stores fp16 scale + zero per 64: bits + 0.5"
        assert ours <= goal * theirs, (fmt, float(ours), float(theirs))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"format": "int3", "block_size": 256}, ValueError, r"block_size must be one of \(32, 64, 128\)"),
        ({"format": "int3", "method": "awq"}, ValueError, "method must be"),
        ({"format": "int3", "method": "gptq"}, ValueError, "needs a hessian"),
        ({"format": "lloyd2", "block_size": 48}, ValueError, "block_size"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        qft.quantize(torch.randn(64), **kwargs)


def test_nan_is_rejected_for_low_bit_formats():
    with pytest.raises(ValueError, match="finite"):
        qft.quantize(torch.tensor([1.0, float("nan")]), "int2")


def test_low_bit_formats_refuse_bitsandbytes_export():
    for fmt in ("lloyd3", "nf3", "int4"):
        with pytest.raises(ValueError, match="bitsandbytes code book"):
            qft.quantize(torch.randn(64), fmt).to_bnb()


@pytest.mark.parametrize("fmt", LOWBIT)
def test_qlora_over_low_bit_formats(fmt):
    qt = qft.quantize(torch.randn(24, 40), fmt, 32)
    x = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 40, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: qft.functional.lora_linear(x, qt, a, b, 0.5), (x, a, b))
    y = qft.functional.lora_linear(x.float().detach(), qt, a.float().detach(), b.float().detach(), 0.5)
    want = x.float() @ qt.dequantize(torch.float32).t() + 0.5 * x.float() @ a.float().t() @ b.float().t()
    torch.testing.assert_close(y, want.detach(), rtol=1e-5, atol=1e-5)
    with qft.ops.use_backend("triton"):  # M = 5: the fused decode-in-matmul Triton kernel
        got = qft.functional.lora_linear(x.float().detach(), qt, a.float().detach(), b.float().detach(), 0.5)
    torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-5)
    with qft.ops.use_backend("triton"):  # M = 40: decode into scratch + GEMM
        x_big = torch.randn(40, 40)
        got = qft.functional.lora_linear(x_big, qt, a.float().detach(), b.float().detach(), 0.5)
    want = x_big @ qt.dequantize(torch.float32).t() + 0.5 * x_big @ a.float().t().detach() @ b.float().t().detach()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_quant_linear_state_dict_for_affine_format():
    layer = qft.nn.QuantLinear.from_linear(torch.nn.Linear(64, 32), qft.QuantConfig("int3", 64))
    state = layer.state_dict()
    assert "weight.zero" in state and "weight.quant_state.qft__int3" in state
    other = qft.nn.QuantLinear.from_linear(torch.nn.Linear(64, 32))
    other.load_state_dict(state)
    assert other.format == "int3" and torch.equal(other.dequantize(), layer.dequantize())


@pytest.mark.parametrize("fmt", LOWBIT)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_decode_equals_reference(fmt, double_quant, dtype):
    # 7 x 45 = 315 values: not a multiple of 32, 16 or the group.
    qt = qft.quantize(torch.randn(7, 45), fmt, 32, double_quant=double_quant)
    want = qt.dequantize(dtype)
    with qft.ops.use_backend("triton"):
        got = qt.dequantize(dtype)
    assert torch.equal(got, want)


@pytest.mark.parametrize("fmt", ["int2", "lloyd2"])
def test_loftq_starts_closer_to_the_full_precision_weight(fmt):
    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 64)
    with torch.no_grad():  # real weights have structure: low rank plus noise
        dense.weight.copy_(torch.randn(64, 8) @ torch.randn(8, 96) / 3 + 0.3 * torch.randn(64, 96))
    config = qft.LoRAConfig(r=8, target_modules=("0",), init="loftq")
    plain = torch.nn.Sequential(torch.nn.Linear(96, 64))
    plain[0].load_state_dict(dense.state_dict())
    qft.add_adapters(plain, config, quant_config=qft.QuantConfig(fmt, 64))
    layer = plain[0]
    start = layer.base_layer.dequantize(torch.float32) + layer.delta_weight()
    plain_error = (qft.quantize(dense.weight.detach(), fmt, 64).dequantize() - dense.weight).norm()
    loftq_error = (start - dense.weight).norm()
    assert loftq_error < 0.7 * plain_error
    x = torch.randn(3, 96)
    torch.testing.assert_close(layer(x), x @ start.t() + dense.bias, rtol=1e-4, atol=1e-4)


def test_loftq_needs_quant_config_and_full_precision_targets():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    config = qft.LoRAConfig(r=4, target_modules=("0",), init="loftq")
    with pytest.raises(ValueError, match="pass quant_config"):
        qft.add_adapters(model, config)
    qft.quantize_(model)
    with pytest.raises(ValueError, match="already quantized"):
        qft.add_adapters(model, config, quant_config=qft.QuantConfig())


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", LOWBIT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_decode_equals_reference(fmt, dtype, backend):
    if backend == "cuda" and not qft._extension.extension().usable:
        pytest.skip("qft._C is not built or sees no GPU")
    for shape in [(7, 45), (512, 4096), (3, 4099)]:
        qt = qft.quantize(torch.randn(shape, device="cuda"), fmt, 64 if fmt.startswith("int") else 128)
        with qft.ops.use_backend("reference"):
            want = qt.dequantize(dtype)
        with qft.ops.use_backend(backend):
            assert torch.equal(qt.dequantize(dtype), want), shape


@pytest.mark.parametrize("fmt", LOWBIT)
@pytest.mark.parametrize("method", ["rtn", "clip", "hqq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_quantize_equals_reference(fmt, method, dtype):
    if method != "hqq" and not fmt.startswith("int"):
        pytest.skip("methods apply to affine formats")
    w = (torch.randn(9, 70) * 2).to(dtype)  # 630 values: partial last group
    w.view(-1)[64:128] = 0  # a constant group
    want = qft.quantize(w, fmt, 64, method=method)
    with qft.ops.use_backend("triton"):
        got = qft.quantize(w, fmt, 64, method=method)
    assert torch.equal(got.packed, want.packed)
    assert torch.equal(got.absmax, want.absmax) and torch.equal(got.nested_absmax, want.nested_absmax)
    if want.zero is not None:
        assert torch.equal(got.zero, want.zero)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", LOWBIT)
@pytest.mark.parametrize("m", [1, 4, 16, 64])
@pytest.mark.parametrize("k", [4096, 1000])
def test_gpu_linear_paths_every_format(fmt, m, k):
    # m <= 4: CUDA GEMV (if built); <= 16: fused Triton; above: decode into scratch + cuBLAS (pinned:
    # the measured table may route every M to cuBLAS on this GPU).
    qt = qft.quantize(torch.randn(256, k, device="cuda", dtype=torch.bfloat16), fmt, 64)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    a, b = torch.randn(16, k, device="cuda"), torch.randn(256, 16, device="cuda")
    with thresholds.forced(fused_max_m=16, gemv_max_m=4):
        got = qft.functional.lora_linear(x, qt, a, b, 0.5)
    w = qt.dequantize(torch.bfloat16).double()
    exact = x.double() @ w.t() + 0.5 * (x.double() @ a.double().t()) @ b.double().t()
    assert (got.double() - exact).abs().max() <= 2e-2 * exact.abs().max()
