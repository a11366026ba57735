"""The qft:: custom ops: opcheck, dispatch, torch.compile, input checks, and the CUDA extension path."""

import pytest
import torch
from cases import DTYPES, SHAPES, edge_weight, ref_dequantize, ref_quantize, weight

import qft
from qft import formats, ops
from qft._extension import cpu_extension


def _op_samples(block_size=64):
    w = torch.randn(7, 130)
    x = torch.randn(3, 130)
    samples = [
        (torch.ops.qft.quantize.default, (w, "nf4", block_size, "hqq", True)),
        (torch.ops.qft.quantize.default, (w.to(torch.bfloat16), "fp4", block_size, "hqq", False)),
        (torch.ops.qft.quantize.default, (w, "int3", block_size, "clip", True)),
    ]
    for fmt, nested, dtype in (
        ("nf4", False, torch.float32),
        ("nf4", True, torch.bfloat16),
        ("lloyd2", True, torch.float16),
        ("int3", False, torch.float32),
    ):
        args = qft.quantize(w, fmt, block_size, nested).op_args()
        samples.append((torch.ops.qft.dequantize.default, (*args, dtype)))
        samples.append((torch.ops.qft.quant_linear.default, (x, *args, None, None, None, 0.0)))
        samples.append(
            (torch.ops.qft.quant_linear_grad_input.default, (torch.randn(3, 7), *args, None, None, None, 1.0))
        )
    return samples


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck_every_op(backend):
    with ops.use_backend(backend):
        for op, args in _op_samples():
            torch.library.opcheck(op, args)


def test_cpu_dispatches_to_the_cpu_backend_or_the_reference():
    default = "cpu" if cpu_extension().usable else "reference"
    assert ops.backend_for("cpu") == default
    with ops.use_backend("triton"):
        assert ops.backend_for("cpu") == "triton"
    assert ops.backend_for("cpu") == default


def test_backend_choices_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("cublas"):
            pass
    monkeypatch.setenv("QFT_BACKEND", "fast")
    with pytest.raises(ValueError, match="QFT_BACKEND"):
        ops.backend_for("cpu")


def _dequantize(parts: dict, numel: int, dtype=torch.float32, fmt="nf4", block_size=64):
    return ops.dequantize(*formats.Weight(parts, fmt, numel, block_size).op_args(), dtype)


def test_dequantize_needs_nested_scales_and_offset_together():
    packed, absmax = ref_quantize(torch.randn(64), 64, "nf4")
    with pytest.raises(ValueError, match="together"):
        _dequantize({"codes": packed, "scales": absmax, "nested_scales": absmax}, 64)


def test_weight_op_arguments_are_checked():
    parts, fmt, meta = qft.quantize(torch.randn(64)).op_args()
    with pytest.raises(ValueError, match="parts must be a list of 5"):
        ops.dequantize(parts[:4], fmt, meta, torch.float32)
    with pytest.raises(ValueError, match="meta must be"):
        ops.dequantize(parts, fmt, meta[:2], torch.float32)
    with pytest.raises(ValueError, match="format must be one of"):
        ops.dequantize(parts, "nf5", meta, torch.float32)


def test_compiled_dequantize_matches_eager():
    qt = qft.quantize(torch.randn(33, 64))

    def decode(parts):
        return ops.dequantize(parts, "nf4", [qt.numel, 64, 256], torch.float32) * 2

    compiled = torch.compile(decode, backend="aot_eager", fullgraph=True)
    parts = qt.op_args()[0]
    assert torch.equal(compiled(parts), decode(parts))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", [32, 64, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_extension_matches_reference_on_gpu(fmt, block_size, dtype):
    if not qft._extension.extension().usable:
        pytest.skip("qft._C is not built or sees no GPU")
    for shape in SHAPES:
        w = edge_weight(shape, dtype, block_size).cuda()
        want_packed, want_absmax = ref_quantize(w, block_size, fmt)
        with ops.use_backend("cuda"):
            packed, absmax = ops.quantize(w, fmt, block_size, "hqq", False)
            assert torch.equal(packed, want_packed) and torch.equal(absmax, want_absmax), shape
            codes, absmax2, offset = ops.quantize(w, fmt, block_size, "hqq", True)[1:]
            for out_dtype in DTYPES:
                want = ref_dequantize(packed, absmax, block_size, fmt, w.numel(), out_dtype)
                got = _dequantize({"codes": packed, "scales": absmax}, w.numel(), out_dtype, fmt, block_size)
                assert torch.equal(got, want), (shape, out_dtype)
                nested = formats.double_quant.dequantize(codes, absmax2, offset)
                want = ref_dequantize(packed, nested, block_size, fmt, w.numel(), out_dtype)
                parts = {"codes": packed, "scales": codes, "nested_scales": absmax2, "offset": offset}
                got = _dequantize(parts, w.numel(), out_dtype, fmt, block_size)
                assert torch.equal(got, want), (shape, out_dtype, "nested")


@pytest.mark.gpu
def test_cuda_extension_handles_unaligned_views():
    if not qft._extension.extension().usable:
        pytest.skip("qft._C is not built or sees no GPU")
    w = torch.randn(4, 256, device="cuda")
    packed, absmax = ref_quantize(w, 64, "nf4")
    shifted = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")[1:]
    shifted.copy_(packed)  # data_ptr % 4 == 1 forces the scalar path
    want = ref_dequantize(packed, absmax, 64, "nf4", w.numel(), torch.bfloat16)
    with ops.use_backend("cuda"):
        got = _dequantize({"codes": shifted, "scales": absmax}, w.numel(), torch.bfloat16)
    assert torch.equal(got, want)


def _parts(n=130, block_size=64):
    packed, absmax = ref_quantize(torch.randn(n), block_size, "nf4")
    codes, absmax2, offset = formats.double_quant.quantize(absmax)
    return packed, absmax, codes, absmax2, offset


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda p: {**p, "packed": p["packed"][:-1]}, ValueError, "codes must hold 65"),
        (lambda p: {**p, "absmax": p["absmax"].half()}, ValueError, "scales must be torch.float32"),
        (lambda p: {**p, "numel": 131}, ValueError, "codes must hold 66"),
        (lambda p: {**p, "numel": -1}, ValueError, "numel must be an int >= 0"),
        (lambda p: {**p, "dtype": torch.int32}, TypeError, "dtype must be"),
    ],
)
def test_dequantize_op_checks_parts_before_any_kernel(backend, change, error, match):
    packed, absmax, *_ = _parts()
    args = change({"packed": packed, "absmax": absmax, "numel": 130, "dtype": torch.float32})
    with ops.use_backend(backend), pytest.raises(error, match=match):
        _dequantize({"codes": args["packed"], "scales": args["absmax"]}, args["numel"], args["dtype"])


def test_dequantize_op_checks_nested_parts():
    packed, absmax, codes, absmax2, offset = _parts()
    with pytest.raises(ValueError, match=r"scales must be torch\.uint8"):
        _dequantize({"codes": packed, "scales": absmax, "nested_scales": absmax2, "offset": offset}, 130)
    with pytest.raises(ValueError, match="nested_scales must hold 1"):
        _dequantize({"codes": packed, "scales": codes, "nested_scales": torch.zeros(2), "offset": offset}, 130)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_inputs_give_empty_outputs(backend):
    with ops.use_backend(backend):
        packed, absmax = ops.quantize(torch.empty(0), "nf4", 64, "hqq", False)
        assert packed.shape == (0,) and absmax.shape == (0,)
        out = _dequantize({"codes": packed, "scales": absmax}, 0, torch.bfloat16)
        assert out.shape == (0,) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_strided_parts_decode_like_contiguous(backend):
    packed, absmax, *_ = _parts(n=256)
    strided_packed = torch.stack([packed, packed], 1)[:, 0]
    strided_absmax = torch.stack([absmax, absmax], 1)[:, 1]
    assert not strided_packed.is_contiguous()
    want = ref_dequantize(packed, absmax, 64, "nf4", 256, torch.float32)
    with ops.use_backend(backend):
        got = _dequantize({"codes": strided_packed, "scales": strided_absmax}, 256)
    assert torch.equal(got, want)


def test_weight_helpers_round_trip():
    w = weight(*_parts()[:2], 64, "nf4", 130)
    assert formats.Weight.from_op_args(*w.op_args()) == w
