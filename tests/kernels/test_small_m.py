"""The fused small-M kernel against the reference for every format, dtype and M = 1..16, with K a
multiple of neither the 64-wide tile nor the block (blocks cross rows), bias and LoRA on: the
equality issue "small-M kernels" asks of every kernel that serves small M (the CUDA GEMV's twin
runs in the GPU suite, tests/formats/test_lowbit.py::test_gpu_linear_paths_every_format)."""

import pytest
import torch

import qft
from qft import formats, ops
from qft.kernels import interpreting
from qft.ops import thresholds

N, K, RANK = 24, 70, 4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_kernel_equals_reference_for_every_small_m(fmt, dtype):
    if dtype == torch.bfloat16 and interpreting():
        pytest.skip("Triton 3.9's interpreter returns garbage from tl.dot on bf16 tiles (GPU suite only)")
    qt = qft.quantize(torch.randn(N, K, device=DEVICE), fmt, 32, double_quant=True)
    w = qt.dequantize(dtype).double()  # the kernel decodes W in x's dtype, as the reference does
    bias = torch.randn(N, dtype=dtype, device=DEVICE)
    xa, lora_b = torch.randn(16, RANK, device=DEVICE), torch.randn(N, RANK, device=DEVICE)
    eps = torch.finfo(dtype).eps
    for m in range(1, 17):
        x = torch.randn(m, K, device=DEVICE).to(dtype)
        args = (*qt.op_args(), bias, xa[:m], lora_b, 0.5)
        with ops.use_backend("triton"), thresholds.forced(fused_max_m=16):
            got = ops.quant_linear(x, *args)
        with ops.use_backend("reference"):
            want = ops.quant_linear(x, *args)
        exact = x.double() @ w.t() + bias.double() + 0.5 * xa[:m].double() @ lora_b.double().t()
        # Both round one fp32 sum (in different orders) to the output dtype: within two of its ulps
        # at the result's scale, plus the fp32 reference's own error.
        own = (want.double() - exact).abs().max().item()
        bound = 2 * max(own, eps * exact.abs().max().item())
        error = (got.double() - exact).abs().max().item()
        assert got.dtype == dtype and got.shape == (m, N)
        assert error <= bound, f"M = {m}: error {error:.3g}, the reference's {own:.3g}"
