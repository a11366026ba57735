"""QuantizedTensor: the public API, its errors, state dicts and devices."""

import sys

import pytest
import torch
from cases import ref_quantize
from safetensors.torch import load_file, save_file

import qft


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_dequantize_shapes_dtypes_and_error(dtype):
    w = torch.randn(48, 160).to(dtype)
    qt = qft.quantize(w)
    assert (qt.shape, qt.dtype, qt.format, qt.block_size, qt.double_quant) == (w.shape, dtype, "nf4", 64, True)
    out = qft.dequantize(qt)
    assert out.shape == w.shape and out.dtype == dtype
    assert qt.dequantize(torch.float32).dtype == torch.float32
    # NF4 on normal weights at block 64: relative Frobenius error ~0.09 (REFERENCE.md: .0920).
    err = (out.float() - w.float()).norm() / w.float().norm()
    assert 0.05 < err < 0.11


def test_every_value_within_half_a_code_gap():
    w = torch.randn(64, 64)
    qt = qft.quantize(w, "nf4", double_quant=False)
    code = qft.formats.code("nf4")
    half_gap = ((code[1:] - code[:-1]) / 2).max()
    bound = qt.absmax.repeat_interleave(64).view_as(w) * half_gap
    assert bool(((qt.dequantize() - w).abs() <= bound * (1 + 1e-6)).all())


def test_non_contiguous_input_equals_contiguous():
    w = torch.randn(96, 130)
    t = w.t()
    assert not t.is_contiguous()
    a, b = qft.quantize(t), qft.quantize(t.contiguous())
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)
    assert a.shape == t.shape


def test_quantized_tensor_is_frozen_and_described():
    qt = qft.quantize(torch.randn(10, 64))
    with pytest.raises(AttributeError):
        qt.block_size = 32
    assert "nf4" in repr(qt) and "bits_per_param" in repr(qt)


def test_nbytes_counts_every_part():
    qt = qft.quantize(torch.randn(256, 256), "nf4", 64, double_quant=True)
    n = 256 * 256
    assert qt.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    plain = qft.quantize(torch.randn(256, 256), "nf4", 64, double_quant=False)
    assert plain.nbytes == n // 2 + 4 * n // 64


def test_to_same_device_is_identity_and_meta_moves_everything():
    qt = qft.quantize(torch.randn(8, 64))
    assert qt.to("cpu") is qt
    moved = qt.to("meta")
    assert all(t.device.type == "meta" for t in (moved.packed, moved.absmax, moved.nested_absmax, moved.offset))
    assert qt.device.type == "cpu", "to() must not change the original"


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip_through_safetensors(tmp_path, double_quant):
    qt = qft.quantize(torch.randn(33, 77, dtype=torch.bfloat16), "fp4", 128, double_quant=double_quant)
    state = qt.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    save_file(state, tmp_path / "w.safetensors")
    back = qft.QuantizedTensor.from_state_dict(load_file(tmp_path / "w.safetensors"))
    assert (back.shape, back.dtype, back.format, back.block_size) == (qt.shape, qt.dtype, "fp4", 128)
    assert torch.equal(back.dequantize(), qt.dequantize())


def _state():
    return qft.quantize(torch.randn(16, 64)).state_dict()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda s: s.pop("packed"), "missing 'packed'"),
        (lambda s: s.pop("offset"), "missing 'offset'"),
        (lambda s: s.update(packed=s["packed"][:-1]), "codes must hold 512 values"),
        (lambda s: s.update(absmax=s["absmax"].float()), "scales must be torch.uint8"),
        (lambda s: s.update(quant_state=torch.tensor([1, 2, 3], dtype=torch.uint8)), "not valid JSON"),
        (lambda s: s.update(quant_state=s["quant_state"].float()), "uint8 tensor of JSON"),
    ],
)
def test_state_dict_that_does_not_fit_is_named(mutate, match):
    state = _state()
    mutate(state)
    with pytest.raises(ValueError, match=match):
        qft.QuantizedTensor.from_state_dict(state)


def test_state_dict_from_another_shape_is_rejected():
    state = _state()
    other = qft.quantize(torch.randn(32, 64)).state_dict()
    state["quant_state"] = other["quant_state"]
    with pytest.raises(ValueError, match="codes must hold 1024 values"):
        qft.QuantizedTensor.from_state_dict(state)


@pytest.mark.parametrize(
    "w, kwargs, error, match",
    [
        (torch.arange(64), {}, TypeError, "w.dtype must be one of"),
        (torch.randn(64).double(), {}, TypeError, "w.dtype"),
        ([1.0, 2.0], {}, TypeError, "w must be a torch.Tensor"),
        (torch.randn(64), {"block_size": 48}, ValueError, "block_size must be one of"),
        (torch.randn(64), {"format": "nf5"}, ValueError, "format must be one of"),
        (torch.randn(64), {"double_quant": 1}, TypeError, "double_quant must be a bool"),
        (torch.empty(0, 64), {}, ValueError, "w must not be empty"),
        (torch.tensor([1.0, float("nan")]), {}, ValueError, "finite"),
        (torch.tensor([1.0, float("inf")]), {}, ValueError, "finite"),
    ],
)
def test_bad_input_is_named(w, kwargs, error, match):
    with pytest.raises(error, match=match):
        qft.quantize(w, **kwargs)


def test_bad_dequantize_dtype_is_named():
    qt = qft.quantize(torch.randn(64))
    with pytest.raises(TypeError, match="dtype must be one of"):
        qt.dequantize(torch.int8)
    with pytest.raises(TypeError, match="qt must be a QuantizedTensor"):
        qft.dequantize(torch.randn(3))


def test_parts_on_different_devices_are_rejected():
    packed, absmax = ref_quantize(torch.randn(64), 64, "nf4")
    with pytest.raises(ValueError, match="scales is on meta but codes are on cpu"):
        qft.QuantizedTensor({"codes": packed, "scales": absmax.to("meta")}, torch.Size([64]), torch.float32, "nf4", 64)


def test_from_bnb_rejects_foreign_code_book():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    packed, state = bnb_functional.quantize_4bit(torch.randn(64), blocksize=64, quant_type="nf4")
    state.code = state.code.flip(0)
    with pytest.raises(ValueError, match="code book"):
        qft.QuantizedTensor.from_bnb(packed, state)
    with pytest.raises(TypeError, match="QuantState"):
        qft.QuantizedTensor.from_bnb(packed, object())


def test_to_bnb_without_bitsandbytes_says_so(monkeypatch):
    qt = qft.quantize(torch.randn(64))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ImportError, match="needs bitsandbytes"):
        qt.to_bnb()
