"""The CPU backend (qft._cpu): the reference's results bit for bit on every path its kernels take."""

import itertools
import os
import shutil

import pytest
import torch

from qft import formats, ops
from qft._extension import CpuExtensionStatus, cpu_extension
from qft.ops import backend_cpu, cpu_calls, dispatch, eager, lora_terms

needs_cpu_kernels = pytest.mark.skipif(not cpu_extension().usable, reason="qft._cpu not built")

ISAS = ("scalar", "avx2")  # the decode and GEMV paths; AVX512-BF16 adds the bf16 kernels (test_bf16_*)
BEST_ISA = "avx512bf16"  # the cap that leaves every path the CPU has

needs_bf16_kernels = pytest.mark.skipif(
    not cpu_extension().usable or cpu_extension().module.detected_isa() != BEST_ISA, reason="no AVX512-BF16 here"
)


@pytest.fixture
def isa_cap():
    """Run under each instruction-set cap, then restore the best."""
    yield lambda name: cpu_calls.module().set_isa_cap(name)
    cpu_calls.module().set_isa_cap(BEST_ISA)


def test_cpu_extension_built_where_a_compiler_exists():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the CPU extension is optional")
    assert cpu_extension().usable, f"qft._cpu did not import: {cpu_extension().error}"
    assert dispatch.backend_for("cpu") == "cpu"
    assert cpu_calls.module().isa() in (*ISAS, BEST_ISA)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _weights():
    """Every format, nested or not, at two block sizes, with a partial last block and an odd count."""
    for name in sorted(formats.FORMATS):
        affine = formats.get_format(name).affine
        for block, nested, numel in itertools.product((32, 64) if affine else (32, 256), (False, True), (4096, 777)):
            w = torch.randn(numel) * 0.03
            w[5] = 0.0  # a zero value and a large one: the table's ends
            w[9] = 0.4
            yield name, formats.quantize(w, name, block, nested=nested)


@needs_cpu_kernels
@pytest.mark.parametrize("isa", [*ISAS, BEST_ISA])  # BEST_ISA: the AVX-512 permutes (capped where absent)
def test_decode_equals_the_reference_bit_for_bit(isa, isa_cap):
    isa_cap(isa)
    for name, q in _weights():
        for dtype in formats.FLOAT_DTYPES:
            ref = formats.dequantize(q, dtype)
            got = backend_cpu.dequantize(q, dtype)
            assert torch.equal(_bits(got), _bits(ref)), f"{name} block {q.block_size} {dtype} nested {q.double_quant}"
            # fp32 rounded through dtype: the GEMM operand equal to the reference's decode in dtype, widened
            wide = torch.empty(q.numel)
            cpu_calls.dequantize(q, wide, dtype)
            assert torch.equal(wide, ref.float()), f"{name} {dtype} through fp32"


@needs_cpu_kernels
def test_decode_of_a_large_weight_splits_over_threads_without_changing_a_bit():
    q = formats.quantize(torch.randn(1 << 21), "nf4", 64, nested=True)  # above the threading threshold
    ref = formats.dequantize(q, torch.bfloat16)
    for threads in (1, 2, 3):
        cpu_calls.module().set_num_threads(threads)
        try:
            assert torch.equal(_bits(backend_cpu.dequantize(q, torch.bfloat16)), _bits(ref))
        finally:
            cpu_calls.module().set_num_threads(0)


@needs_cpu_kernels
def test_dequantize_op_runs_the_cpu_kernel(monkeypatch):
    q = formats.quantize(torch.randn(512), "int3", 64)
    calls = []
    monkeypatch.setattr(backend_cpu, "dequantize", lambda w, dtype: calls.append(dtype) or formats.dequantize(w, dtype))
    ops.dequantize(*q.op_args(), torch.float16)
    assert calls == [torch.float16]


@needs_cpu_kernels
def test_kernel_refusals_raise_value_error():
    q = formats.quantize(torch.randn(256), "nf4", 64)
    with pytest.raises(ValueError, match="fp32 or"):
        cpu_calls.dequantize(q, torch.empty(255), torch.float32)
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        cpu_calls.dequantize(q, torch.empty(512)[::2], torch.float32)
    with pytest.raises(ValueError, match="refused"):  # a width qft does not pack
        code = formats.code("nf4", "cpu").data_ptr()
        weight = (q.codes.data_ptr(), q.scales.data_ptr(), 0, 0, 0, code, 0, 5, False, 256, 64, 256)
        cpu_calls.module().dequantize(weight=weight, out=torch.empty(256).data_ptr(), out_dtype=0, round_dtype=0)


def _lora_step(backend, fmt, dtype, m, bias):
    torch.manual_seed(1)
    w = torch.randn(96, 128)
    q = formats.quantize(w.reshape(-1), fmt, 64, nested=True)
    from qft.adapters.lora.function import lora_linear
    from qft.tensor import QuantizedTensor

    qt = QuantizedTensor(q.parts, torch.Size((96, 128)), dtype, fmt, 64)
    x = torch.randn(m, 128, dtype=dtype, requires_grad=True)
    a = (torch.randn(8, 128) * 0.1).requires_grad_()
    b = (torch.randn(96, 8) * 0.1).requires_grad_()
    bias_t = torch.randn(96, dtype=dtype) if bias else None
    with ops.use_backend(backend):
        y = lora_linear(x, qt, a, b, 2.0, bias_t)
        y.backward(torch.randn_like(y))
    return y, x.grad, a.grad, b.grad


@needs_cpu_kernels
@pytest.mark.parametrize("fmt", ["nf4", "int3", "lloyd2_icq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lora_forward_and_backward_equal_the_reference_bit_for_bit(fmt, dtype):
    for m, bias in ((1, False), (8, True), (33, True)):  # the GEMV, the bf16 kernels (bf16), decode + GEMM
        ours = _lora_step("cpu", fmt, dtype, m, bias)
        theirs = _lora_step("reference", fmt, dtype, m, bias)
        half = backend_cpu.half_gemm(torch.empty(m, 1, dtype=dtype))
        gemv = m <= backend_cpu.GEMV_MAX_M  # the forward only: its own sums (test_gemv_*)
        q = formats.quantize(torch.randn(96 * 128), fmt, 64)
        fused = backend_cpu.fused(torch.empty(m, 96, dtype=dtype), q, backward=True)  # own sums (test_bf16_*)
        thin = lora_terms.kernels_take(torch.empty(m, 128, dtype=dtype), torch.empty(8, 128))  # test_thin_*
        for name, a, b in zip(("y", "grad_x", "grad_A", "grad_B"), ours, theirs, strict=True):
            if (name == "y" and gemv) or ((half or fused) and name in ("y", "grad_x")):  # within a rounding
                ulp = {torch.float32: 2**-20, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
                torch.testing.assert_close(a, b, rtol=ulp, atol=ulp * b.abs().max().item())
            elif thin and name in ("grad_A", "grad_B"):  # fp32 sums in another order, of xa's too
                torch.testing.assert_close(a, b, rtol=2**-14, atol=2**-14 * b.abs().max().item())
            else:  # the adapters' gradients read grad and x, not W; grad_x at small M is decode + GEMM
                assert torch.equal(a, b), f"{name} differs ({fmt}, {dtype}, M={m})"


def _exact_linear(x, q, n, bias, xa, b, scaling):
    w = formats.dequantize(q, torch.float32).double().view(n, -1)
    return x.double() @ w.t() + bias.double() + scaling * xa.double() @ b.double().t()


@needs_cpu_kernels
@pytest.mark.parametrize("isa", ISAS)
def test_gemv_is_as_close_to_the_exact_product_as_the_reference(isa, isa_cap):
    # The GEMV sums level(q) * x and scales per block (as the CUDA GEMV): not the reference's bits, but
    # never farther from the float64 product of the decoded fp32 weight than the reference's rounding.
    isa_cap(isa)
    from qft import reference

    for name in sorted(formats.FORMATS):
        affine = formats.get_format(name).affine
        for (n, k), m, dtype in itertools.product([(48, 128), (8, 96)], (1, 3, 8), formats.FLOAT_DTYPES):
            q = formats.quantize(torch.randn(n * k) * 0.05, name, 32 if affine else 64, nested=m == 3)
            x, bias = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
            xa, b = torch.randn(m, 4), torch.randn(n, 4) * 0.1
            y = torch.empty(m, n, dtype=dtype)
            cpu_calls.quant_gemv(x, q, bias, xa, b, 0.5, y)
            exact = _exact_linear(x, q, n, bias, xa, b, 0.5)
            ref = reference.quant_linear(x, formats.dequantize(q, dtype).view(n, k), bias, xa, b, 0.5)
            ours, theirs = (y.double() - exact).abs().max(), (ref.double() - exact).abs().max()
            assert ours <= 2 * theirs + 1e-5 * exact.abs().max(), f"{name} {dtype} M={m}: {ours} vs {theirs}"


@needs_cpu_kernels
def test_gemv_takes_small_m_only_and_refuses_what_it_cannot_serve():
    q = formats.quantize(torch.randn(64 * 96), "nf4", 32)
    assert backend_cpu.gemv(torch.empty(backend_cpu.GEMV_MAX_M, 96), q)
    assert not backend_cpu.gemv(torch.empty(backend_cpu.GEMV_MAX_M + 1, 96), q)
    odd = formats.quantize(torch.randn(64 * 80), "nf4", 32)  # K = 80: not whole 32-value chunks
    assert not backend_cpu.gemv(torch.empty(1, 80), odd)
    rows = cpu_calls.max_gemv_rows() + 1
    with pytest.raises(ValueError, match="refused"):
        cpu_calls.quant_gemv(torch.randn(rows, 96), q, None, None, None, 0.0, torch.empty(rows, 64))
    with pytest.raises(ValueError, match="must be"):
        cpu_calls.quant_gemv(torch.randn(1, 96), q, None, None, None, 0.0, torch.empty(1, 63))


def _bf16_case(name, n, k, m, lora, block=None):
    """A weight, bf16 x and grad, bias and fp32 LoRA operands; and the float64 products of the weight as
    the reference decodes it into bf16 (the kernels' operands, exactly)."""
    affine = formats.get_format(name).affine
    block = block or (32 if affine else 64)
    q = formats.quantize(torch.randn(n * k) * 0.05, name, block, nested=n % 2 == 1)
    w = formats.dequantize(q, torch.bfloat16).double().view(n, k)
    x, grad = torch.randn(m, k).bfloat16(), torch.randn(m, n).bfloat16()
    bias = torch.randn(n).bfloat16()
    xa, b = (torch.randn(m, 4), torch.randn(n, 4) * 0.1) if lora else (None, None)
    gxa, a = (torch.randn(m, 4), torch.randn(4, k) * 0.1) if lora else (None, None)
    return q, w, x, grad, bias, xa, b, gxa, a


@needs_bf16_kernels
def test_bf16_kernels_are_as_close_to_the_exact_product_as_the_reference():
    # bf16 dot products of the reference's operands (W decoded into bf16, x bf16) summed in fp32 in another
    # order: every element within one bf16 rounding of where the reference's lies from the float64 product.
    # Shapes with a partial 16-row tile, an odd N, K not a multiple of 64 (a half column tile), M over 16
    # rows, and a partial last quantization block (17 x 64 in blocks of 256). N = 33 packs grad's full
    # 16-row blocks by 16 x 16 transposes and then its odd last column.
    from qft import reference

    cases = [((40, 96), None), ((17, 64), None), ((17, 64), 256), ((33, 64), None)]
    for name in sorted(formats.FORMATS):
        for ((n, k), block), m, lora in itertools.product(cases, (1, 5, 16, 21), (False, True)):
            q, w, x, grad, bias, xa, b, gxa, a = _bf16_case(name, n, k, m, lora, block)
            y = cpu_calls.quant_linear_bf16(x, q, bias, xa, b, 0.5)
            gx = cpu_calls.quant_linear_grad_input_bf16(grad, q, gxa, a)
            exact_y = x.double() @ w.t() + bias.double()
            exact_gx = grad.double() @ w
            if lora:
                exact_y += 0.5 * xa.double() @ b.double().t()
                exact_gx += gxa.double() @ a.double()
            w16 = w.bfloat16()
            ref_y = reference.quant_linear(x, w16, bias, xa, b, 0.5)
            ref_gx = reference.quant_linear_grad_input(grad, w16, gxa, a)
            for label, ours, theirs, exact in (("y", y, ref_y, exact_y), ("grad_x", gx, ref_gx, exact_gx)):
                err, ref_err = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
                assert ours.dtype == torch.bfloat16 and ours.shape == exact.shape
                bound = ref_err + 2**-8 * exact.abs() + 1e-6 * exact.abs().max()  # one bf16 rounding more
                where = f"{name} {label} {n}x{k} block {q.block_size} M={m}"
                assert (err <= bound).all(), f"{where}: {(err - bound).max()} over"


@needs_bf16_kernels
def test_bf16_kernels_decode_the_weight_bit_for_bit():
    # One-hot activations pick single weights: a sum of one exact product, so the outputs are the decoded
    # weights themselves, which must equal the reference's decode into bf16 bit for bit (every format,
    # nested or not, blocks of 32 to 256 over rows of 64).
    for name, q in _weights():
        if q.numel % 64:
            continue
        n, k = q.numel // 64, 64
        ref = formats.dequantize(q, torch.bfloat16).view(n, k)
        columns = cpu_calls.quant_linear_bf16(torch.eye(k).bfloat16(), q, None, None, None, 0.0)
        rows = cpu_calls.quant_linear_grad_input_bf16(torch.eye(n).bfloat16(), q)
        normal = ref.abs() >= torch.finfo(torch.float32).tiny  # the dot products flush subnormal operands
        zero = ref == 0  # compared by value: a sum from +0 turns a -0 weight into +0
        for label, got in (("forward", columns.t()), ("grad input", rows)):
            assert torch.equal(_bits(got[normal]), _bits(ref[normal])), f"{name} block {q.block_size} {label}"
            assert (got[zero] == 0).all(), f"{name} block {q.block_size} {label}: a zero weight"


@needs_cpu_kernels
def test_large_calls_split_over_torchs_openmp_threads_and_small_ones_stay_on_one():
    m = cpu_calls.module()
    if not m.built_with_openmp():
        pytest.skip("qft._cpu built without OpenMP: every call runs on one thread")
    if os.environ.get("OMP_DYNAMIC") or os.environ.get("OMP_THREAD_LIMIT"):
        pytest.skip("OpenMP may give smaller teams than asked for here")
    # One OpenMP runtime in the process: torch's (a second one would start a second team of threads).
    assert cpu_extension().threads.startswith("OpenMP threads of"), cpu_extension().threads
    big, small = 64 << 20, 1 << 10
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the team follows torch's setting
        assert m.num_threads() == 2
        assert m.team_size(8, big) == 2 and m.team_size(8, small) == 1 and m.team_size(1, big) == 1
        torch.set_num_threads(1)
        assert m.team_size(8, big) == 1
    finally:
        torch.set_num_threads(previous)


@needs_cpu_kernels
def test_beside_a_second_openmp_runtime_every_call_runs_on_one_thread(monkeypatch):
    import qft._extension as extension

    m = cpu_calls.module()
    if not m.built_with_openmp():
        pytest.skip("qft._cpu built without OpenMP: every call runs on one thread")
    ours = os.path.realpath(m.openmp_library())
    try:
        for runtimes in ({ours, "/elsewhere/libgomp-0123abcd.so.1"}, None):  # torch's renamed copy; no /proc
            monkeypatch.setattr(extension, "_openmp_runtimes", lambda runtimes=runtimes: runtimes)
            assert extension._share_torchs_threads(m).startswith("one thread")
            assert m.num_threads() == 1 and m.team_size(8, 64 << 20) == 1
    finally:
        monkeypatch.undo()
        assert extension._share_torchs_threads(m).startswith("OpenMP threads of")
    assert m.team_size(8, 64 << 20) == min(8, m.num_threads())


@needs_bf16_kernels
def test_bf16_kernels_split_over_threads_without_changing_a_bit():
    # Above the threading threshold, the packing of x and grad too (130 rows: 9 blocks, the last partial).
    q, _, x, grad, bias, xa, b, gxa, a = _bf16_case("nf4", 1024, 512, 130, True)
    results = []
    for threads in (1, 2, 3):
        cpu_calls.module().set_num_threads(threads)
        try:
            y = cpu_calls.quant_linear_bf16(x, q, bias, xa, b, 0.5)
            results.append((_bits(y), _bits(cpu_calls.quant_linear_grad_input_bf16(grad, q, gxa, a))))
        finally:
            cpu_calls.module().set_num_threads(0)
    for y, gx in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(gx, results[0][1])


@needs_bf16_kernels
def test_bf16_kernels_refuse_what_they_cannot_serve(isa_cap):
    q = formats.quantize(torch.randn(64 * 96), "nf4", 32)
    with pytest.raises(ValueError, match="2-D bf16"):
        cpu_calls.quant_linear_bf16(torch.randn(4, 96), q, None, None, None, 1.0)
    with pytest.raises(ValueError, match="fp32"):
        cpu_calls.quant_linear_grad_input_bf16(
            torch.randn(4, 64).bfloat16(), q, torch.randn(4, 2).double(), torch.randn(2, 96).double()
        )
    x = torch.randn(4, 96).bfloat16()
    with pytest.raises(ValueError, match="bias must be"):  # the kernel would read 64 values of it
        cpu_calls.quant_linear_bf16(x, q, torch.randn(63), None, None, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_calls.quant_linear_bf16(x, q, None, torch.randn(4, 2), torch.randn(63, 2), 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_calls.quant_linear_grad_input_bf16(torch.randn(4, 64).bfloat16(), q, torch.randn(3, 2), torch.randn(2, 96))
    with pytest.raises(ValueError, match="both"):
        cpu_calls.quant_linear_bf16(x, q, None, torch.randn(4, 2), None, 1.0)
    odd = formats.quantize(torch.randn(64 * 80), "nf4", 32)  # K = 80: not whole 32-value chunks
    with pytest.raises(ValueError, match="refused"):
        cpu_calls.quant_linear_bf16(torch.randn(4, 80).bfloat16(), odd, None, None, None, 1.0)
    isa_cap("avx2")  # a CPU without AVX512-BF16: refused, and never routed there
    assert not cpu_calls.bf16_kernels()
    assert not backend_cpu.fused(torch.empty(8, 96, dtype=torch.bfloat16), q)
    with pytest.raises(ValueError, match="refused"):
        cpu_calls.quant_linear_bf16(torch.randn(4, 96).bfloat16(), q, None, None, None, 1.0)


@needs_bf16_kernels
def test_bf16_kernels_take_bf16_from_their_least_m_while_the_activations_fit(monkeypatch):
    q = formats.quantize(torch.randn(64 * 96), "nf4", 32)
    lo = backend_cpu.FUSED_MIN_M
    assert backend_cpu.fused(torch.empty(lo, 96, dtype=torch.bfloat16), q)
    assert not backend_cpu.fused(torch.empty(lo - 1, 96, dtype=torch.bfloat16), q)  # the GEMV's
    assert backend_cpu.fused(torch.empty(1, 64, dtype=torch.bfloat16), q, backward=True)
    # The bound is on the activations' bytes (x forward, grad backward), not on M alone.
    rows = backend_cpu.FUSED_MAX_ACTIVATION_BYTES // (96 * 2)
    assert backend_cpu.fused(torch.empty(rows, 96, dtype=torch.bfloat16), q)
    assert not backend_cpu.fused(torch.empty(rows + 1, 96, dtype=torch.bfloat16), q)
    rows = backend_cpu.FUSED_MAX_ACTIVATION_BYTES // (64 * 2)
    assert backend_cpu.fused(torch.empty(rows, 64, dtype=torch.bfloat16), q, backward=True)
    assert not backend_cpu.fused(torch.empty(rows + 1, 64, dtype=torch.bfloat16), q, backward=True)
    assert not backend_cpu.fused(torch.empty(8, 96, dtype=torch.float16), q)
    calls = []
    real = cpu_calls.quant_linear_grad_input_bf16
    monkeypatch.setattr(cpu_calls, "quant_linear_grad_input_bf16", lambda *a: calls.append(1) or real(*a))
    grad = torch.randn(8, 64).bfloat16()
    backend_cpu.linear_grad_input(grad, q, None, None, None, 1.0)
    mask = torch.ones(8, 96, dtype=torch.bool)  # dropout: the reference's path, which applies the mask
    backend_cpu.linear_grad_input(grad, q, torch.randn(8, 2), torch.randn(2, 96), mask, 2.0)
    assert calls == [1]


@needs_cpu_kernels
@pytest.mark.parametrize("isa", [*ISAS, BEST_ISA])
def test_oft_rotation_grad_kernel_is_the_closed_form_in_fp32(isa, isa_cap):
    # The reference's closed form in float64 is the yardstick: fp32 sums in another order stay within a
    # few fp32 roundings of it, on the AVX-512 rows (b of 16 to 64) and the scalar loop (b = 8, 24) alike.
    from qft import reference

    isa_cap(isa)
    for b, terms, blocks in ((32, 5, 3), (16, 3, 2), (64, 2, 1), (8, 5, 4), (24, 4, 2)):
        params = torch.randn(blocks, b * (b - 1) // 2) * 0.05
        grad_rot = torch.randn(blocks, b, b)
        coefficients = reference.oft_neumann_coefficients(terms)
        got = cpu_calls.oft_rotation_params_grad(params, grad_rot, b, coefficients)
        exact = reference.oft_rotation_params_grad(params.double(), grad_rot.double(), b, terms)
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
        isa_cap(BEST_ISA)  # the same bits at every width: each sum runs over k in order by fused multiply-adds
        assert torch.equal(got, cpu_calls.oft_rotation_params_grad(params, grad_rot, b, coefficients))
        isa_cap(isa)


@needs_bf16_kernels
def test_oft_rotation_backward_takes_the_kernel_for_fp32_on_the_cpu_backend(monkeypatch, isa_cap):
    from qft.ops import oft as oft_ops

    calls = []
    real = cpu_calls.oft_rotation_params_grad
    monkeypatch.setattr(cpu_calls, "oft_rotation_params_grad", lambda *a: calls.append(1) or real(*a))
    params = (torch.randn(4, 120) * 0.05).requires_grad_()
    oft_ops.rotation(params, 16, 5).sum().backward()
    assert calls == [1]
    with ops.use_backend("reference"):
        oft_ops.rotation(params, 16, 5).sum().backward()
        oft_ops.rotation(params.detach().double().requires_grad_(), 16, 5).sum().backward()
    oft_ops.rotation((torch.randn(4, 28) * 0.05).requires_grad_(), 8, 5).sum().backward()  # b = 8: scalar loop
    isa_cap("avx2")  # no AVX-512 rows: the reference's batched matmuls
    oft_ops.rotation(params, 16, 5).sum().backward()
    assert calls == [1]
    isa_cap(BEST_ISA)
    ones = oft_ops.oft_rotation_backward(params.detach(), torch.ones(4, 16, 16), 16, 1)  # R = I for one term
    assert torch.equal(ones, torch.zeros(4, 120))
    # an empty batch's rotation backward: the reference's zeros, not a refused kernel call
    x = torch.randn(0, 64)
    grad_x, grad_rot = oft_ops.oft_rotate_backward(x, x.clone(), torch.randn(4, 16, 16))
    assert grad_x.shape == (0, 64) and torch.equal(grad_rot, torch.zeros(4, 16, 16))


@needs_bf16_kernels
@pytest.mark.parametrize("dtype", formats.FLOAT_DTYPES)
def test_oft_rotate_kernel_equals_the_reference_bit_for_bit_where_routed(dtype):
    # The kernel's k-ordered fused multiply-adds are the order torch's batched GEMM takes at these shapes,
    # which is what keeps OFT PEFT-exact on this path; fewer rows or blocks are left to the reference.
    from qft import reference
    from qft.ops import oft as oft_ops

    for m, blocks, b in ((16, 16, 32), (33, 4, 16), (128, 16, 32), (40, 8, 64), (17, 5, 48), (300, 32, 32)):
        x, rot = torch.randn(m, blocks * b).to(dtype), torch.randn(blocks, b, b)
        assert oft_ops.cpu_rotates(x, rot)
        for transpose in (False, True):
            got = cpu_calls.oft_rotate(x, rot, transpose)
            assert torch.equal(got, reference.oft_rotate(x, rot, transpose)), f"{dtype} {m}x{blocks}x{b} {transpose}"
        grad = torch.randn(m, blocks * b).to(dtype)
        exact = reference.oft_rotation_grad(x.double(), grad.double(), blocks, b)
        got = cpu_calls.oft_rotation_grad(x, grad, blocks, b)
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


@needs_bf16_kernels
def test_oft_rotate_kernel_is_routed_only_where_it_is_the_reference(isa_cap):
    from qft.ops import oft as oft_ops

    rot = torch.randn(16, 32, 32)
    assert oft_ops.cpu_rotates(torch.randn(oft_ops.CPU_ROTATE_MIN_ROWS, 512), rot)
    assert not oft_ops.cpu_rotates(torch.randn(oft_ops.CPU_ROTATE_MIN_ROWS - 1, 512), rot)
    assert not oft_ops.cpu_rotates(torch.randn(64, 96), torch.randn(3, 32, 32))  # too few blocks
    assert not oft_ops.cpu_rotates(torch.randn(64, 480), torch.randn(20, 24, 24))  # b not a multiple of 16
    assert not oft_ops.cpu_rotates(torch.randn(64, 512).double(), rot.double())
    with ops.use_backend("reference"):
        assert not oft_ops.cpu_rotates(torch.randn(64, 512), rot)
    isa_cap("avx2")
    assert not oft_ops.cpu_rotates(torch.randn(64, 512), rot)
    with pytest.raises(ValueError, match="refused"):
        cpu_calls.oft_rotate(torch.randn(64, 512), rot, False)


@needs_cpu_kernels
def test_half_gemm_is_taken_only_for_bf16_at_enough_rows(monkeypatch):
    monkeypatch.setattr(cpu_calls.module(), "native_bf16", lambda: True, raising=False)
    assert backend_cpu.half_gemm(torch.empty(backend_cpu.HALF_GEMM_MIN_M, 4, dtype=torch.bfloat16))
    assert not backend_cpu.half_gemm(torch.empty(backend_cpu.HALF_GEMM_MIN_M - 1, 4, dtype=torch.bfloat16))
    assert not backend_cpu.half_gemm(torch.empty(64, 4, dtype=torch.float16))
    assert not backend_cpu.half_gemm(torch.empty(64, 4))


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kwargs", [{}, {"maximize": True}, {"betas": (0.4, 0.99)}])
def test_8bit_step_state_equals_the_reference_bit_for_bit(dtype, kwargs):
    from qft.optim import PagedAdamW8bit

    torch.manual_seed(0)
    shapes = [(64, 96), (5000,), (300,), (300001,)]  # partial blocks; the last splits over threads
    start = [torch.randn(s).to(dtype) for s in shapes]

    def run(backend):
        params = [p.clone().requires_grad_() for p in start]
        opt = PagedAdamW8bit(params, lr=1e-2, weight_decay=0.1, min_8bit_size=300, **kwargs)
        g = torch.Generator().manual_seed(1)
        with ops.use_backend(backend):
            for _ in range(6):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=g).to(dtype)
                opt.step()
        return params, opt

    plain, plain_opt = run("reference")
    fast, fast_opt = run("cpu")
    for a, b in zip(plain, fast, strict=True):
        sa, sb = plain_opt.state[a], fast_opt.state[b]
        assert sa["exp_avg"].dtype == torch.uint8
        assert all(torch.equal(sa[k], sb[k]) for k in sa), "state differs"
        # the parameter: within an ulp where torch's vectorized sqrt rounds differently from IEEE's
        ulp = {torch.float32: 2**-22, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
        torch.testing.assert_close(b, a, rtol=ulp, atol=ulp * a.abs().max().item())


@needs_cpu_kernels
def test_8bit_step_takes_the_kernel_and_32bit_state_stays_on_torch(monkeypatch):
    from qft.ops import adamw as adamw_op
    from qft.optim import PagedAdamW, PagedAdamW8bit

    seen = []
    monkeypatch.setattr(adamw_op, "cpu_step", lambda *a: seen.append("cpu"))
    monkeypatch.setattr(adamw_op, "reference_step", lambda *a: seen.append("reference"))
    for cls in (PagedAdamW8bit, PagedAdamW):
        p = torch.nn.Parameter(torch.randn(5000))
        p.grad = torch.randn(5000)
        cls([p]).step()
    assert seen == ["cpu", "reference"]


def test_without_the_extension_cpu_ops_run_on_the_reference(monkeypatch):
    missing = CpuExtensionStatus(None, "not built")
    monkeypatch.setattr(dispatch, "cpu_extension", lambda: missing)
    assert dispatch.backend_for("cpu") == "reference"
    with pytest.raises(RuntimeError, match="CPU extension is not available: not built"):
        with ops.use_backend("cpu"):
            pass
    q = formats.quantize(torch.randn(256), "nf4", 64)
    assert torch.equal(ops.dequantize(*q.op_args(), torch.float32), formats.dequantize(q, torch.float32))


def test_switching_the_kernels_off_is_reported(monkeypatch):
    from qft import _extension

    monkeypatch.setenv("QFT_CPU_KERNELS", "0")
    _extension.cpu_extension.cache_clear()
    try:
        status = _extension.cpu_extension()
        assert not status.usable and "QFT_CPU_KERNELS=0" in status.error
    finally:
        _extension.cpu_extension.cache_clear()


def test_eager_call_runs_the_body_only_where_nothing_could_tell():
    from torch._subclasses.fake_tensor import FakeTensorMode

    hits = []
    body = eager._bodies[ops.quant_linear]
    eager._bodies[ops.quant_linear] = lambda *a: hits.append("body") or body(*a)
    try:
        q = formats.quantize(torch.randn(64 * 32), "nf4", 64)
        x = torch.randn(2, 32)
        args = (*q.op_args(), None, None, None, 0.0)
        with torch.no_grad():
            direct = eager.call(ops.quant_linear, x, *args)
        assert hits == ["body"]
        via_op = eager.call(ops.quant_linear, x, *args)  # autograd on: the dispatcher
        assert hits == ["body"] and torch.equal(direct, via_op)
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = eager.call(ops.quant_linear, mode.from_tensor(x), *args)
        assert hits == ["body"] and fake.shape == (2, 64)
    finally:
        eager._bodies[ops.quant_linear] = body


@needs_cpu_kernels
def test_small_m_edge_inputs_behave_as_on_the_reference():
    q = formats.quantize(torch.randn(64 * 96), "nf4", 32)
    args = q.op_args()
    with torch.no_grad():
        empty = ops.quant_linear(torch.randn(0, 96), *args, None, None, None, 0.0)
        assert empty.shape == (0, 64)
        x = torch.randn(2, 96)
        for bias in (torch.randn(1), torch.randn(64, dtype=torch.float64)):  # broadcast, float64
            ours = ops.quant_linear(x, *args, bias, None, None, 0.0)
            with ops.use_backend("reference"):
                theirs = ops.quant_linear(x, *args, bias, None, None, 0.0)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError):  # LoRA factors that do not fit: torch's error, no stray read
            ops.quant_linear(x, *args, None, torch.randn(2, 4), torch.randn(64, 2), 1.0)


def test_oft_positions_cached_under_inference_mode_still_train():
    from qft import reference

    block = 12  # a size no other test caches first
    with torch.inference_mode():
        reference.oft_skew(torch.randn(2, block * (block - 1) // 2), block)
    params = torch.randn(2, block * (block - 1) // 2, requires_grad=True)
    reference.oft_rotation(params, block, 5, use_neumann=False).sum().backward()
    assert params.grad is not None and torch.isfinite(params.grad).all()


def test_qft_backend_cpu_without_the_extension_is_refused(monkeypatch):
    monkeypatch.setattr(dispatch, "cpu_extension", lambda: CpuExtensionStatus(None, "not built"))
    monkeypatch.setenv("QFT_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match="QFT_BACKEND=cpu"):
        dispatch.backend_for("cpu")


def test_eager_bypass_takes_parameters_and_leaves_functorch_transforms_alone():
    assert eager.untraced_cpu(torch.nn.Parameter(torch.randn(3)))
    seen = torch.func.vmap(lambda t: torch.tensor(eager.untraced_cpu(t)))(torch.randn(2, 3))
    assert not seen.any()


@needs_bf16_kernels
def test_thin_products_are_fp32_sums_of_the_exact_products():
    # Each value within the classic bound of an n-term fp32 sum (n * 2^-24 * sum |products|) of the float64
    # product: both forms, with rows not a multiple of 4, widths past whole vectors and odd output counts.
    for rows, width, outs in ((1, 16, 1), (5, 100, 3), (33, 1000, 19), (64, 4096, 16), (6, 64, 8)):
        a = torch.randn(rows, width).bfloat16()
        f_nt, f_tn = torch.randn(outs, width), torch.randn(rows, outs)
        exact = a.double() @ f_nt.double().t()
        bound = width * 2**-24 * (a.double().abs() @ f_nt.double().abs().t())
        assert ((cpu_calls.bf16_times_fp32_nt(a, f_nt).double() - exact).abs() <= bound).all()
        exact = f_tn.double().t() @ a.double()
        bound = rows * 2**-24 * (f_tn.double().abs().t() @ a.double().abs())
        assert ((cpu_calls.fp32_tn_times_bf16(f_tn, a).double() - exact).abs() <= bound).all()


@needs_bf16_kernels
def test_thin_products_refuse_what_they_cannot_read():
    a, f = torch.randn(4, 32).bfloat16(), torch.randn(3, 32)
    with pytest.raises(ValueError, match="bf16 and a 2-D fp32"):
        cpu_calls.bf16_times_fp32_nt(a.float(), f)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_calls.bf16_times_fp32_nt(a, torch.randn(3, 16))
    with pytest.raises(ValueError, match="do not fit"):
        cpu_calls.fp32_tn_times_bf16(torch.randn(5, 3), a)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_calls.fp32_tn_times_bf16(torch.randn(3, 4).t(), a)


@needs_bf16_kernels
def test_lora_thin_products_take_the_kernels_only_where_they_may(monkeypatch):
    calls = []
    real = cpu_calls.bf16_times_fp32_nt
    monkeypatch.setattr(cpu_calls, "bf16_times_fp32_nt", lambda *a: calls.append(1) or real(*a))
    x, a = torch.randn(8, 64).bfloat16(), torch.randn(4, 64)
    assert torch.equal(lora_terms.adapter_input(x.float(), a), x.float() @ a.t())  # fp32 x: the reference's
    assert calls == []
    got = lora_terms.adapter_input(x, a)
    assert calls == [1] and got.dtype == torch.float32
    torch.testing.assert_close(got, x.float() @ a.t(), rtol=2**-18, atol=2**-18 * got.abs().max().item())
    assert not lora_terms.kernels_take(x, a.requires_grad_())  # autograd would not see the kernel
    with ops.use_backend("reference"):
        assert not lora_terms.kernels_take(x, a.detach())


@needs_bf16_kernels
def test_lora_backward_takes_the_thin_kernels_for_bf16_grad_and_fp32_adapters(monkeypatch):
    from qft import reference

    calls = []
    real = cpu_calls.fp32_tn_times_bf16
    monkeypatch.setattr(cpu_calls, "fp32_tn_times_bf16", lambda *a: calls.append(1) or real(*a))
    q = formats.quantize(torch.randn(48 * 64), "nf4", 64)
    lora_A, lora_B = torch.randn(4, 64), torch.randn(48, 4)
    for dtype, expected in ((torch.float32, []), (torch.bfloat16, [1, 1])):  # grad_A and grad_B
        calls.clear()
        grad, x = torch.randn(20, 48).to(dtype), torch.randn(20, 64).to(dtype)
        xa = x.float() @ lora_A.t()
        got = backend_cpu.lora_backward(grad, q, x, xa, lora_A, lora_B, 0.5, None, 1.0, False)
        assert calls == expected, dtype
        want = reference.lora_backward(grad, x, xa, lora_A, lora_B, 0.5, False, None)
        for ours, theirs in zip(got[1:], want[1:], strict=True):
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype and ours.is_contiguous()
            torch.testing.assert_close(ours, theirs, rtol=2**-18, atol=2**-18 * theirs.abs().max().item())
