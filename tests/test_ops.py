"""The qft:: custom ops: opcheck, dispatch, torch.compile, and the CUDA extension path on a GPU."""

import pytest
import torch
from cases import DTYPES, SHAPES, edge_weight

import qft
from qft import ops, reference


def _op_samples(block_size=64):
    w = torch.randn(7, 130)
    packed, absmax = reference.quantize_4bit(w, block_size, "nf4")
    codes, absmax2, offset = reference.quantize_nested(absmax)
    n = w.numel()
    return [
        (torch.ops.qft.quantize_4bit.default, (w, block_size, "nf4")),
        (torch.ops.qft.quantize_4bit.default, (w.to(torch.bfloat16), block_size, "fp4")),
        (torch.ops.qft.dequantize_4bit.default, (packed, absmax, None, None, block_size, "nf4", n, torch.float32)),
        (torch.ops.qft.dequantize_4bit.default, (packed, codes, absmax2, offset, block_size, "nf4", n, torch.bfloat16)),
        (torch.ops.qft.quantize_nested.default, (absmax, 256)),
        (torch.ops.qft.dequantize_nested.default, (codes, absmax2, offset, 256)),
    ]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck_every_op(backend):
    with ops.use_backend(backend):
        for op, args in _op_samples():
            torch.library.opcheck(op, args)


def test_cpu_dispatches_to_reference():
    assert ops.backend_for("cpu") == "reference"
    with ops.use_backend("triton"):
        assert ops.backend_for("cpu") == "triton"
    assert ops.backend_for("cpu") == "reference"


def test_backend_choices_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("cublas"):
            pass
    monkeypatch.setenv("QFT_BACKEND", "fast")
    with pytest.raises(ValueError, match="QFT_BACKEND"):
        ops.backend_for("cpu")


def test_dequantize_needs_nested_absmax_and_offset_together():
    packed, absmax = reference.quantize_4bit(torch.randn(64), 64, "nf4")
    with pytest.raises(ValueError, match="together"):
        ops.dequantize_4bit(packed, absmax, absmax, None, 64, "nf4", 64, torch.float32)


def test_compiled_dequantize_matches_eager():
    qt = qft.quantize(torch.randn(33, 64))

    def decode(packed, absmax, absmax2, offset):
        return ops.dequantize_4bit(packed, absmax, absmax2, offset, 64, "nf4", qt.numel, torch.float32) * 2

    compiled = torch.compile(decode, backend="aot_eager", fullgraph=True)
    args = (qt.packed, qt.absmax, qt.nested_absmax, qt.offset)
    assert torch.equal(compiled(*args), decode(*args))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", [32, 64, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_extension_matches_reference_on_gpu(fmt, block_size, dtype):
    if not qft._extension.extension().usable:
        pytest.skip("qft._C is not built or sees no GPU")
    for shape in SHAPES:
        w = edge_weight(shape, dtype, block_size).cuda()
        want_packed, want_absmax = reference.quantize_4bit(w, block_size, fmt)
        with ops.use_backend("cuda"):
            packed, absmax = ops.quantize_4bit(w, block_size, fmt)
            assert torch.equal(packed, want_packed) and torch.equal(absmax, want_absmax), shape
            codes, absmax2, offset = ops.quantize_nested(absmax, 256)
            for out_dtype in DTYPES:
                want = reference.dequantize_4bit(packed, absmax, block_size, fmt, w.numel(), out_dtype)
                got = ops.dequantize_4bit(packed, absmax, None, None, block_size, fmt, w.numel(), out_dtype)
                assert torch.equal(got, want), (shape, out_dtype)
                nested = reference.dequantize_nested(codes, absmax2, offset)
                want = reference.dequantize_4bit(packed, nested, block_size, fmt, w.numel(), out_dtype)
                got = ops.dequantize_4bit(packed, codes, absmax2, offset, block_size, fmt, w.numel(), out_dtype)
                assert torch.equal(got, want), (shape, out_dtype, "nested")


@pytest.mark.gpu
def test_cuda_extension_handles_unaligned_views():
    if not qft._extension.extension().usable:
        pytest.skip("qft._C is not built or sees no GPU")
    w = torch.randn(4, 256, device="cuda")
    packed, absmax = reference.quantize_4bit(w, 64, "nf4")
    shifted = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")[1:]
    shifted.copy_(packed)  # data_ptr % 4 == 1 forces the scalar path
    want = reference.dequantize_4bit(packed, absmax, 64, "nf4", w.numel(), torch.bfloat16)
    with ops.use_backend("cuda"):
        got = ops.dequantize_4bit(shifted, absmax, None, None, 64, "nf4", w.numel(), torch.bfloat16)
    assert torch.equal(got, want)


def _parts(n=130, block_size=64):
    packed, absmax = reference.quantize_4bit(torch.randn(n), block_size, "nf4")
    codes, absmax2, offset = reference.quantize_nested(absmax)
    return packed, absmax, codes, absmax2, offset


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda p: {**p, "packed": p["packed"][:-1]}, ValueError, "packed must hold 65"),
        (lambda p: {**p, "absmax": p["absmax"].half()}, ValueError, "absmax must be torch.float32"),
        (lambda p: {**p, "numel": 131}, ValueError, "packed must hold 66"),
        (lambda p: {**p, "numel": -1}, ValueError, "numel must be a non-negative int"),
        (lambda p: {**p, "dtype": torch.int32}, TypeError, "dtype must be"),
    ],
)
def test_dequantize_op_checks_parts_before_any_kernel(backend, change, error, match):
    packed, absmax, *_ = _parts()
    args = change({"packed": packed, "absmax": absmax, "numel": 130, "dtype": torch.float32})
    with ops.use_backend(backend), pytest.raises(error, match=match):
        ops.dequantize_4bit(args["packed"], args["absmax"], None, None, 64, "nf4", args["numel"], args["dtype"])


def test_dequantize_op_checks_nested_parts():
    packed, absmax, codes, absmax2, offset = _parts()
    with pytest.raises(ValueError, match=r"absmax must be torch\.uint8"):
        ops.dequantize_4bit(packed, absmax, absmax2, offset, 64, "nf4", 130, torch.float32)
    with pytest.raises(ValueError, match="nested_absmax must hold 1"):
        ops.dequantize_4bit(packed, codes, torch.zeros(2), offset, 64, "nf4", 130, torch.float32)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_inputs_give_empty_outputs(backend):
    with ops.use_backend(backend):
        packed, absmax = ops.quantize_4bit(torch.empty(0), 64, "nf4")
        assert packed.shape == (0,) and absmax.shape == (0,)
        out = ops.dequantize_4bit(packed, absmax, None, None, 64, "nf4", 0, torch.bfloat16)
        assert out.shape == (0,) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_strided_parts_decode_like_contiguous(backend):
    packed, absmax, *_ = _parts(n=256)
    strided_packed = torch.stack([packed, packed], 1)[:, 0]
    strided_absmax = torch.stack([absmax, absmax], 1)[:, 1]
    assert not strided_packed.is_contiguous()
    want = reference.dequantize_4bit(packed, absmax, 64, "nf4", 256, torch.float32)
    with ops.use_backend(backend):
        got = ops.dequantize_4bit(strided_packed, strided_absmax, None, None, 64, "nf4", 256, torch.float32)
    assert torch.equal(got, want)
