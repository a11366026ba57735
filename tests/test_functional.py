"""qft.functional.quant_linear / lora_linear: gradients, saved tensors, paths, compile, errors."""

import pytest
import torch
from numerics import assert_as_accurate_as_reference
from torch.utils.checkpoint import checkpoint

import qft
from qft import functional as F
from qft import ops, reference
from qft.ops import thresholds


def _qt(n=24, k=40, block_size=32, double_quant=True):
    return qft.quantize(torch.randn(n, k), "nf4", block_size, double_quant=double_quant)


def _adapters(qt, r=4, dtype=torch.float64):
    n, k = qt.shape
    a = torch.randn(r, k, dtype=dtype, requires_grad=True)
    b = torch.randn(n, r, dtype=dtype, requires_grad=True)
    return a, b


def test_gradcheck_quant_linear_float64():
    qt = _qt()
    x = torch.randn(2, 3, 40, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: F.quant_linear(x, qt, b), (x, bias))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_lora_linear_float64(dropout):
    qt = _qt(block_size=64)  # 24*40 values: blocks cross rows
    x = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    a, b = _adapters(qt)
    bias = torch.randn(24, dtype=torch.float64, requires_grad=True)

    def fn(x, a, b, bias):
        torch.manual_seed(3)  # the same dropout mask on every evaluation
        return F.lora_linear(x, qt, a, b, 0.75, bias, dropout)

    assert torch.autograd.gradcheck(fn, (x, a, b, bias))


def test_lora_forward_is_peft_formula():
    qt = _qt()
    x = torch.randn(6, 40)
    a, b = (t.float().detach() for t in _adapters(qt))
    w = qt.dequantize(torch.float32)
    want = x @ w.t() + 0.5 * (x @ a.t()) @ b.t()
    torch.testing.assert_close(F.lora_linear(x, qt, a, b, 0.5), want, rtol=1e-5, atol=1e-5)


def test_output_follows_x_dtype_with_fp32_adapters():
    qt = qft.quantize(torch.randn(24, 40, dtype=torch.bfloat16))
    x = torch.randn(3, 40, dtype=torch.bfloat16, requires_grad=True)
    a, b = (t.float().detach().requires_grad_() for t in _adapters(qt))
    y = F.lora_linear(x, qt, a, b, 2.0)
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def _saved(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_saved_for_backward_is_small_by_construction(dtype):
    m, k, n, r = 32, 128, 96, 8
    qt = qft.quantize(torch.randn(n, k, dtype=dtype))
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    a = torch.randn(r, k, requires_grad=True)
    b = torch.randn(n, r, requires_grad=True)
    saved = _saved(lambda: F.lora_linear(x, qt, a, b, 2.0))
    assert not any(t.numel() >= n * k and t.dtype.is_floating_point and t.shape != a.shape for t in saved)
    assert sum(t.data_ptr() == x.data_ptr() for t in saved) == 1, "x saved exactly once"
    assert not any(t.dtype == torch.float32 and t.shape == (m, k) for t in saved if dtype != torch.float32)
    other = [t for t in saved if t.data_ptr() not in (x.data_ptr(), a.data_ptr(), b.data_ptr())]
    assert [tuple(t.shape) for t in other] == [(m, r)], "only the LoRA intermediate M x r besides x, A, B"

    with_dropout = _saved(lambda: F.lora_linear(x, qt, a, b, 2.0, dropout=0.1))
    extra = [t for t in with_dropout if t.dtype == torch.bool]
    assert [tuple(t.shape) for t in extra] == [(m, k)], "dropout adds one bool mask"

    assert _saved(lambda: F.quant_linear(x, qt)) == [], "quant_linear keeps nothing but the packed weight"


@pytest.mark.parametrize("m", [1, 3, 17, 40])
@pytest.mark.parametrize("double_quant", [True, False])
def test_triton_paths_match_reference(m, double_quant):
    # m <= 16 runs the fused Triton kernel; above it, decode into scratch + GEMM (fp32 in the interpreter).
    qt = qft.quantize(torch.randn(48, 100), "nf4", 64, double_quant=double_quant)
    x = torch.randn(m, 100, requires_grad=True)
    a = torch.randn(4, 100, requires_grad=True)
    b = torch.randn(48, 4, requires_grad=True)
    bias = torch.randn(48, requires_grad=True)
    results = []
    for backend, dtype in (("reference", torch.float32), ("triton", torch.float32), ("reference", torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, a, b, bias)]
        with ops.use_backend(backend):
            y = F.lora_linear(leaves[0], qt, leaves[1], leaves[2], 0.5, leaves[3])
            y.backward(torch.ones_like(y))
        results.append([y.detach(), *(t.grad for t in leaves)])
    # Summation order differs (interpreter vs torch): bounded by the fp32 reference's own error.
    assert_as_accurate_as_reference(
        results[1], results[0], results[2], ["y", "grad x", "grad A", "grad B", "grad bias"]
    )


def test_fused_kernel_against_fp64():
    from qft.kernels.quant_matmul import quant_matmul

    qt = qft.quantize(torch.randn(70, 130), "fp4", 32)
    x, xa, lora_b, bias = torch.randn(5, 130), torch.randn(5, 8), torch.randn(70, 8), torch.randn(70)
    y = quant_matmul(x, qt.weight, bias, xa, lora_b, 0.3)
    w = qt.dequantize(torch.float32).double()
    want = reference.quant_linear(x.double(), w, bias.double(), xa.double(), lora_b.double(), 0.3)
    fp32_err = (reference.quant_linear(x, w.float(), bias, xa, lora_b, 0.3).double() - want).abs().max()
    assert (y.double() - want).abs().max() <= 4 * fp32_err + 1e-6


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("adapter", ["lora", "oft"])
def test_compiled_adapter_model_matches_eager(backend, adapter):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))
    qft.quantize_(model)
    if adapter == "lora":
        qft.add_adapters(model, qft.LoRAConfig(r=4, target_modules=("0", "2")))
        for layer in qft.nn.lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    else:
        qft.add_adapters(model, qft.OFTConfig(block_size=16, target_modules=("0", "2")))
        for layer in qft.nn.oft_layers(model).values():
            torch.nn.init.normal_(layer.oft_R.weight, std=0.05)
    x = torch.randn(8, 32)
    eager_y = model(x)
    eager_y.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    # inductor may fuse the float ops around the qft:: ops differently: fp32 rounding only.
    torch.testing.assert_close(y, eager_y, rtol=1e-5, atol=1e-6)
    for got, want in zip((p.grad for p in model.parameters() if p.requires_grad), eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_gives_same_grads():
    qt = _qt()
    x = torch.randn(4, 40, requires_grad=True)
    a, b = (t.float().detach().requires_grad_() for t in _adapters(qt))

    def run(use_checkpoint):
        for t in (x, a, b):
            t.grad = None
        torch.manual_seed(1)
        fn = lambda x: F.lora_linear(x, qt, a, b, 1.0, dropout=0.2)
        y = checkpoint(fn, x, use_reentrant=False) if use_checkpoint else fn(x)
        y.pow(2).sum().backward()
        return x.grad.clone(), a.grad.clone(), b.grad.clone()

    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"x": torch.randn(3, 41)}, ValueError, "last dimension must be in_features=40"),
        ({"x": torch.randn(3, 40).int()}, TypeError, "x must be a float32"),
        ({"lora_A": torch.randn(4, 39)}, ValueError, r"lora_A must be \[r, 40\]"),
        ({"lora_B": torch.randn(24, 5)}, ValueError, r"lora_B must be \[24, 4\]"),
        ({"lora_B": torch.randn(24, 4).double()}, TypeError, "share a dtype"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"scaling": float("nan")}, TypeError, "scaling must be a finite number"),
        ({"bias": torch.randn(23)}, ValueError, r"bias must be a tensor of shape \(24,\)"),
        ({"qt": torch.randn(24, 40)}, TypeError, "qt must be a QuantizedTensor"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    qt = _qt()
    args = {"x": torch.randn(3, 40), "qt": qt, "lora_A": torch.randn(4, 40), "lora_B": torch.randn(24, 4)}
    args |= {"scaling": 1.0, "bias": None, "dropout": 0.0}
    args |= kwargs
    with pytest.raises(error, match=match):
        F.lora_linear(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 4, 16, 64, 300])
@pytest.mark.parametrize("k", [4096, 1000])
def test_gpu_paths_match_reference(dtype, m, k):
    # m <= 4: CUDA GEMV (if built); <= 16: fused Triton; above: scratch decode + cuBLAS.
    qt = qft.quantize(torch.randn(512, k, device="cuda", dtype=dtype))
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    xa, lora_b, bias = (torch.randn(*s, device="cuda") for s in ((m, 16), (512, 16), (512,)))
    args = (*qt.op_args(), bias.to(dtype), xa, lora_b, 0.5)
    with ops.use_backend("reference"):
        want = ops.quant_linear(x, *args)
    with thresholds.forced(fused_max_m=16, gemv_max_m=4):  # every path, whatever the measured table says
        got = ops.quant_linear(x, *args)
    exact = reference.quant_linear(
        x.double(), qt.dequantize(dtype).double(), bias.to(dtype).double(), xa.double(), lora_b.double(), 0.5
    )
    ref_err = (want.double() - exact).abs().max()
    assert (got.double() - exact).abs().max() <= 2 * ref_err + 1e-3 * exact.abs().max()


def test_threshold_table_routes_small_m(monkeypatch):
    import qft.kernels.quant_matmul as fused_module

    def fused_called(*args, **kwargs):
        raise AssertionError("the fused small-M kernel ran")

    monkeypatch.setattr(fused_module, "quant_matmul", fused_called)
    qt = qft.quantize(torch.randn(64, 128))
    x = torch.randn(3, 128)
    cpu = torch.device("cpu")
    assert thresholds.fused_max_m(cpu) == thresholds.FUSED_MAX_M["default"] >= 3
    with ops.use_backend("triton"):
        with pytest.raises(AssertionError, match="fused small-M kernel ran"):
            F.quant_linear(x, qt)
        with thresholds.forced(fused_max_m=0):  # sm90's measured entry: decode + GEMM at every M
            assert thresholds.fused_max_m(cpu) == 0
            got = F.quant_linear(x, qt)
    assert thresholds.fused_max_m(cpu) == thresholds.FUSED_MAX_M["default"]
    torch.testing.assert_close(got, x @ qt.dequantize(torch.float32).t())
