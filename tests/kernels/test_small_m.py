"""The fused small-M kernel against the reference for every format, dtype and M = 1..16, with K a
multiple of neither the 64-wide tile nor the block (blocks cross rows: the per-value decode), and
with K a multiple of the block (blocks inside rows: the per-tile decode) for blocks smaller than,
equal to and larger than the tile; bias and LoRA on. The CUDA GEMV's twin runs in the GPU suite
(tests/formats/test_lowbit.py::test_gpu_linear_paths_every_format)."""

import pytest
import torch

import qft
from qft import formats, ops
from qft.kernels import interpreting
from qft.ops import thresholds

N, RANK = 24, 4
# (K, block size, M values): blocks crossing rows at every M; then blocks inside rows at a few M.
CASES = [(70, 32, range(1, 17)), (128, 32, (1, 5, 16)), (192, 64, (1, 16)), (256, 128, (3,))]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k, block_size, ms", CASES)
def test_fused_kernel_equals_reference_for_every_small_m(fmt, dtype, k, block_size, ms):
    if dtype == torch.bfloat16 and interpreting():
        pytest.skip("Triton 3.9's interpreter returns garbage from tl.dot on bf16 tiles (GPU suite only)")
    qt = qft.quantize(torch.randn(N, k, device=DEVICE), fmt, block_size, double_quant=True)
    w = qt.dequantize(dtype).double()  # the kernel decodes W in x's dtype, as the reference does
    bias = torch.randn(N, dtype=dtype, device=DEVICE)
    xa, lora_b = torch.randn(16, RANK, device=DEVICE), torch.randn(N, RANK, device=DEVICE)
    eps = torch.finfo(dtype).eps
    for m in ms:
        x = torch.randn(m, k, device=DEVICE).to(dtype)
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
