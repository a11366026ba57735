"""LoRA inside the large-M GEMMs (``qft.ops.gemm``): the decode into rows of a wider buffer, the K + r
forward and backward against the reference, and what a bf16 layer allocates on that path.

The GPU backends' large-M path runs here on CPU tensors (``use_backend("triton")``, Triton's decode
under the interpreter; M above the fused small-M kernel's limit)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qft
from qft import formats, ops
from qft.adapters.lora.function import lora_linear
from qft.ops import backend_triton, gemm, schema

M_LARGE = 40  # above thresholds.FUSED_MAX_M["default"]: decode into scratch + GEMM


@pytest.mark.parametrize("fmt", ["nf4", "lloyd3", "int2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_into_rows_of_a_wider_buffer(fmt, dtype):
    weight = formats.quantize(torch.randn(24, 96), fmt, 32, nested=True)
    want = backend_triton.dequantize(weight, dtype).view(24, 96)
    wide = torch.full((24, 96 + 13), -7.0, dtype=dtype)
    backend_triton.dequantize(weight, dtype, wide[:, :96])
    assert torch.equal(wide[:, :96], want)
    assert (wide[:, 96:] == -7).all()  # the columns beside W are untouched


def _case(dtype, dropout, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    qt = qft.quantize(torch.randn(48, 64, generator=g), "nf4", 64)
    x = torch.randn(M_LARGE, 64, generator=g).to(dtype).requires_grad_()
    a = (0.1 * torch.randn(8, 64, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(48, 8, generator=g)).requires_grad_()
    bias_t = torch.randn(48, generator=g).to(dtype) if bias else None
    return qt, x, a, b, bias_t


def _run(backend, dtype, dropout, bias):
    qt, x, a, b, bias_t = _case(dtype, dropout, bias)
    torch.manual_seed(1)  # the same dropout mask on both backends
    with ops.use_backend(backend):
        y = lora_linear(x, qt, a, b, 0.5, bias_t, dropout)
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        y.backward(grad)
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bias", [False, True])
def test_k_plus_r_gemms_match_the_reference(dtype, dropout, bias):
    got = _run("triton", dtype, dropout, bias)
    want = _run("reference", dtype, dropout, bias)
    # fp32: the same sums in another order; bf16: B, s xa and the LoRA grads' operands rounded to
    # bf16 (the reference keeps the LoRA terms in fp32), a few bf16 ulps of the largest value.
    tol = 1e-5 if dtype == torch.float32 else 2**-7  # bf16: 5.7e-3 at worst (grad_B)
    for name, g, w in zip(("y", "grad_x", "grad_A", "grad_B"), got, want, strict=True):
        assert g.dtype == w.dtype, name
        scale = w.abs().max().item()
        assert (g.float() - w.float()).abs().max().item() <= tol * scale, name


def test_k_plus_r_forward_takes_one_gemm_and_no_m_by_n_epilogue(monkeypatch):
    calls = []
    real = gemm.linear
    monkeypatch.setattr(gemm, "linear", lambda *a: calls.append(a) or real(*a))
    qt, x, a, b, _ = _case(torch.float32, 0.0, False)
    with ops.use_backend("triton"):
        lora_linear(x.detach(), qt, a.detach(), b.detach(), 0.5)
    assert calls == []  # the LoRA layer went through gemm.lora_forward


class _Allocations(TorchDispatchMode):
    """Every tensor an aten op creates (new storage, not a view of an input): op, shape and dtype. A
    ``qft::`` op is one node to the dispatcher, so its Python body runs with the mode back on, and
    what it creates inside is recorded too."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "qft":
            with self:
                return getattr(schema, func._opname)._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.made.append((func.__name__, tuple(t.shape), t.dtype))
        return out


def test_bf16_layer_makes_no_m_by_n_temporary_and_no_large_fp32_tensor():
    m, k, n, r = 256, 512, 768, 8
    qt = qft.quantize(torch.randn(n, k), "nf4", 64)
    x = torch.randn(m, k, dtype=torch.bfloat16, requires_grad=True)
    a = (0.1 * torch.randn(r, k)).requires_grad_()
    b = (0.1 * torch.randn(n, r)).requires_grad_()
    grad = torch.randn(m, n, dtype=torch.bfloat16)
    with ops.use_backend("triton"):
        lora_linear(x, qt, a, b, 0.5, None, 0.1)  # warm: the scratch buffer is allocated once
        record = _Allocations()
        with record:
            y = lora_linear(x, qt, a, b, 0.5, None, 0.1)
            y.backward(grad)
    assert any(op.startswith("addmm") or op.startswith("mm") for op, _, _ in record.made)  # it saw inside
    m_by_n = [e for e in record.made if e[1] in ((m, n), (n, m))]
    assert len(m_by_n) == 1 and m_by_n[0][2] == torch.bfloat16, m_by_n  # y itself
    largest_fp32 = max([m * r, r * k, n * r])  # M x r pieces and the adapters' own sizes
    big_fp32 = [e for e in record.made if e[2] == torch.float32 and torch.Size(e[1]).numel() > largest_fp32]
    assert big_fp32 == []


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["nf4", "lloyd3", "int2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_into_rows_of_a_wider_buffer(fmt, dtype):
    from qft.ops import backend_cuda

    weight = formats.quantize(torch.randn(96, 256, device="cuda"), fmt, 64, nested=True)
    want = backend_cuda.dequantize(weight, dtype).view(96, 256)
    wide = torch.full((96, 256 + 24), -7.0, dtype=dtype, device="cuda")
    backend_cuda.dequantize(weight, dtype, wide[:, :256])
    assert torch.equal(wide[:, :256], want) and (wide[:, 256:] == -7).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_gpu_k_plus_r_gemms_match_the_reference(dropout):
    qt, x, a, b, bias = _case(torch.bfloat16, dropout, True)
    qt = qt.to("cuda")
    x, a, b, bias = (t.detach().cuda().requires_grad_(t.requires_grad) for t in (x, a, b, bias))
    results = []
    for backend in ("reference", "cuda"):
        for t in (x, a, b):
            t.grad = None
        torch.manual_seed(1)
        with ops.use_backend(backend):
            y = lora_linear(x, qt, a, b, 0.5, bias, dropout)
            y.backward(torch.ones_like(y))
        results.append([y.detach(), x.grad, a.grad, b.grad])
    for name, g, w in zip(("y", "grad_x", "grad_A", "grad_B"), *results, strict=True):
        assert (g.float() - w.float()).abs().max().item() <= 2**-6 * w.abs().max().item(), name
