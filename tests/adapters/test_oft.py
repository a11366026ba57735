"""QOFT: PEFT-exact OFT over quantized bases (against PEFT OFT over bitsandbytes Linear4bit, CPU)."""

import contextlib

import pytest
import torch
from numerics import assert_as_accurate_as_reference
from peft_models import TwoLayer, oft_twins

import qft
from qft import functional as F
from qft import ops, reference

CASES = [  # (block_size, Cayley-Neumann terms, use Neumann, block_share, coft)
    (8, 5, True, False, False),
    (16, 1, True, False, False),
    (32, 2, True, False, False),
    (32, 3, True, False, False),
    (32, 4, True, False, False),
    (64, 8, True, False, False),
    (16, 5, False, False, False),
    (16, 5, True, True, False),
    (16, 5, True, False, True),
]


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_grads_equal_peft_oft_over_bitsandbytes(dtype, case, rows=3):
    peft_model, ours = oft_twins(TwoLayer(dtype=dtype), dtype, *case)
    x = torch.randn(rows, 5, 64, dtype=dtype)
    x_peft, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_peft, y_ours = peft_model(x_peft), ours(x_ours)
    # Same rotated input, same decoded weight: one bf16 ulp at most (here: equal).
    assert _rel(y_ours, y_peft) <= (2**-8 if dtype == torch.bfloat16 else 1e-6)
    grad = torch.randn_like(y_peft)
    y_peft.backward(grad)
    y_ours.backward(grad)
    assert _rel(x_ours.grad, x_peft.grad) <= (2**-8 if dtype == torch.bfloat16 else 1e-6)
    base = peft_model.base_model.model
    for name in ("fc1", "fc2"):
        theirs, mine = getattr(base, name).oft_R["default"].weight.grad, getattr(ours, name).oft_R.weight.grad
        if theirs is None:  # n = 1: R = I does not depend on the parameters
            assert mine is None
            continue
        assert mine.dtype == torch.float32 and _rel(mine, theirs) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_that_take_the_cpu_rotation_kernel_equal_peft_too(dtype, monkeypatch):
    from qft.ops import cpu_calls

    if not cpu_calls.cpu_extension().usable or not cpu_calls.bf16_kernels():
        pytest.skip("qft._cpu's rotation needs AVX-512")
    calls = []
    real = cpu_calls.oft_rotate
    monkeypatch.setattr(cpu_calls, "oft_rotate", lambda *a: calls.append(a[0].shape) or real(*a))
    # 20 rows of 4 (fc1) and 8 (fc2) blocks of 16: qft.ops.oft routes them to qft._cpu's rotation
    test_forward_and_grads_equal_peft_oft_over_bitsandbytes(dtype, (16, 5, True, False, False), rows=4)
    assert len(calls) == 4  # both layers' forward rotations and backward grad_x rotations


def test_adapters_move_between_qft_and_peft(tmp_path):
    from peft import PeftModel

    peft_model, ours = oft_twins(TwoLayer(), torch.float32, 16)
    x = torch.randn(4, 64)
    peft_model.save_pretrained(tmp_path / "from_peft")
    _, fresh = oft_twins(TwoLayer(), torch.float32, 16)
    for layer in qft.nn.oft_layers(fresh).values():
        torch.nn.init.zeros_(layer.oft_R.weight)
    fresh_base = TwoLayer()
    qft.quantize_(fresh_base)
    for name in ("fc1", "fc2"):
        getattr(fresh_base, name).load_state_dict(getattr(ours, name).base_layer.state_dict())
    qft.load_adapters(fresh_base, tmp_path / "from_peft")  # builds OFT layers from adapter_config.json
    torch.testing.assert_close(fresh_base(x), ours(x))

    with torch.no_grad():
        ours.fc2.oft_R.weight.mul_(2)
    qft.save_adapters(ours, tmp_path / "from_qft")
    plain = peft_model.base_model.model
    for name in ("fc1", "fc2"):
        setattr(plain, name, getattr(plain, name).base_layer)
    loaded = PeftModel.from_pretrained(plain, tmp_path / "from_qft", is_trainable=True)
    torch.testing.assert_close(loaded(x), ours(x))


def test_gradcheck_float64():
    qt = qft.quantize(torch.randn(24, 32), "nf4", 32)
    x = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)
    w = (0.1 * torch.randn(4, 28, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: F.oft_linear(x, qt, w, 8), (x, w))


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("transpose", [False, True])
def test_triton_rotation_matches_reference(block_size, transpose):
    x = torch.randn(19, 4 * block_size)
    rot = reference.oft_rotation(0.05 * torch.randn(4, block_size * (block_size - 1) // 2), block_size)
    with ops.use_backend("triton"):
        got = ops.oft_rotate(x, rot, transpose)
    torch.testing.assert_close(got, reference.oft_rotate(x, rot, transpose), rtol=1e-6, atol=1e-6)


def test_saved_for_backward_has_no_fp32_copy_of_x():
    qt = qft.quantize(torch.randn(96, 128, dtype=torch.bfloat16))
    x = torch.randn(32, 128, dtype=torch.bfloat16, requires_grad=True)
    w = (0.05 * torch.randn(4, 496)).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F.oft_linear(x, qt, w, 32)
    # Building R saves parameter-sized [4, 32, 32] tensors; of the M x K ones only x, in bf16.
    per_row = [t for t in saved if t.dim() == 2 and t.shape[0] == 32]
    assert [(t.dtype, tuple(t.shape)) for t in per_row] == [(torch.bfloat16, (32, 128))], "x once, in bf16"
    assert not any(t.numel() >= 96 * 128 for t in saved), "nothing of size out x in"


def test_block_size_that_does_not_divide_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(48, 16))
    with pytest.raises(ValueError, match="does not divide in_features 48"):
        qft.add_adapters(model, qft.OFTConfig(block_size=32, target_modules=("0",)))
    assert type(model[0]) is torch.nn.Linear
    qt = qft.quantize(torch.randn(16, 48))
    with pytest.raises(ValueError, match="does not divide"):
        F.oft_linear(torch.randn(2, 48), qt, torch.zeros(1, 496), 32)
    with pytest.raises(ValueError, match="oft_weight must be"):
        F.oft_linear(torch.randn(2, 48), qt, torch.zeros(3, 10), 16)


def test_fresh_adapter_is_identity_and_merge_round_trips():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    x = torch.randn(3, 64)
    want = model(x)
    qft.add_adapters(model, qft.OFTConfig(block_size=16, target_modules=("0",)))
    torch.testing.assert_close(model(x), want)
    torch.nn.init.normal_(model[0].oft_R.weight, std=0.05)
    rotated = model(x)
    qft.merge_adapters(model)
    torch.testing.assert_close(model(x), rotated, rtol=1e-5, atol=1e-5)
    qft.unmerge_adapters(model)
    torch.testing.assert_close(model(x), rotated, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.oft_R.weight"}


def test_adapter_for_another_shape_is_refused(tmp_path):
    a = torch.nn.Sequential(torch.nn.Linear(64, 32))
    qft.add_adapters(a, qft.OFTConfig(block_size=16, target_modules=("0",)))
    qft.save_adapters(a, tmp_path / "a")
    b = torch.nn.Sequential(torch.nn.Linear(64, 32))
    qft.add_adapters(b, qft.OFTConfig(block_size=32, target_modules=("0",)))
    with pytest.raises(ValueError, match="oft_R: adapter has shape"):
        qft.load_adapters(b, tmp_path / "a")


def _oft_linear_case(dtype, device="cpu"):
    """y, grad x, grad w of a 40-row OFT linear (b = 32 over a 256x512 nf4 weight), on the CPU."""
    torch.manual_seed(0)
    qt = qft.quantize(torch.randn(256, 512), "nf4")
    w = (0.05 * torch.randn(16, 496)).to(torch.float64 if dtype == torch.float64 else torch.float32)
    x = torch.randn(40, 512).to(dtype)
    w, x = w.to(device).requires_grad_(), x.to(device).requires_grad_()
    y = F.oft_linear(x, qt.to(device), w, 32)
    y.to(torch.float64).sum().backward()
    return [t.detach().cpu() for t in (y, x.grad, w.grad)]


def _assert_fp32_close_to_fp64(got, reference, exact):
    # fp32 rounding alone moves grad w by ~1e-3 here (dR sums rows x features, |dw| up to ~2e3): the
    # error against fp64 is bounded by 4x the CPU fp32 reference's own (TF32 anywhere would be ~1000x).
    assert_as_accurate_as_reference(got, reference, exact, ["y", "grad x", "grad w"])


def test_triton_oft_linear_fp32_is_as_accurate_as_the_reference():
    exact = _oft_linear_case(torch.float64)
    reference = _oft_linear_case(torch.float32)
    with ops.use_backend("triton"):
        got = _oft_linear_case(torch.float32)
    _assert_fp32_close_to_fp64(got, reference, exact)
    with pytest.raises(AssertionError, match="grad w: error"):  # the bound catches a 1e-3 relative error
        _assert_fp32_close_to_fp64([got[0], got[1], got[2] * (1 + 1e-3)], reference, exact)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_oft_linear_matches_cpu_reference(dtype):
    reference = _oft_linear_case(dtype)
    got = _oft_linear_case(dtype, "cuda")
    if dtype == torch.float32:
        _assert_fp32_close_to_fp64(got, reference, _oft_linear_case(torch.float64))
        return
    for a, ref in zip(got, reference, strict=True):
        torch.testing.assert_close(a.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("m", [3, 40])
def test_triton_small_and_large_m_paths_match_reference(block_size, m):
    # x rotated once, then m = 3: the fused small-M kernel; m = 40: decode + GEMM.
    qt = qft.quantize(torch.randn(48, 128), "nf4", 64)
    w = 0.05 * torch.randn(128 // block_size, block_size * (block_size - 1) // 2)
    x = torch.randn(m, 128)
    want = F.oft_linear(x, qt, w, block_size)
    with ops.use_backend("triton"):
        got = F.oft_linear(x, qt, w, block_size)
    assert_as_accurate_as_reference([got], [want], [F.oft_linear(x.double(), qt, w.double(), block_size)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_m_at_least_n_rotates_the_weight_not_x(monkeypatch, dtype):
    import qft.ops.gemm as gemm_module

    rotated = []
    rotate = gemm_module.oft_rotate
    monkeypatch.setattr(gemm_module, "oft_rotate", lambda t, *a: rotated.append(tuple(t.shape)) or rotate(t, *a))
    qt = qft.quantize(torch.randn(48, 64), "nf4", 64)
    w = (0.05 * torch.randn(2, 32 * 31 // 2)).requires_grad_()
    x = torch.randn(64, 64).to(dtype).requires_grad_()  # M = 64 >= N = 48, above the fused kernel's M
    grad = torch.randn(64, 48).to(dtype)
    results = {}
    for backend in ("reference", "triton"):
        x.grad = w.grad = None
        with ops.use_backend(backend):
            y = F.oft_linear(x, qt, w, 32)
            y.backward(grad)
        results[backend] = (y.detach(), x.grad, w.grad)
    assert rotated == [(48, 64)]  # the decoded weight, once; the reference rotated x
    exact_x = x.detach().double().requires_grad_()
    exact_w = w.detach().double().requires_grad_()
    exact = F.oft_linear(exact_x, qt, exact_w, 32)
    exact.backward(grad.double())
    # W R^T rounded where x R was: as far from the exact answer as the reference, up to bf16's last bit
    want, got = results["reference"], results["triton"]
    assert_as_accurate_as_reference(list(got), list(want), [exact.detach(), exact_x.grad, exact_w.grad])


def test_small_m_rotates_x_once_then_runs_the_plain_kernel(monkeypatch):
    import qft.kernels.quant_matmul as fused_module
    import qft.ops.schema as schema

    rotations, seen = [], []
    rotate, fused = schema.oft_rotate, fused_module.quant_matmul
    monkeypatch.setattr(schema, "oft_rotate", lambda *a: rotations.append(a) or rotate(*a))
    monkeypatch.setattr(fused_module, "quant_matmul", lambda x, *a: seen.append(x) or fused(x, *a))
    qt = qft.quantize(torch.randn(48, 64), "nf4", 64)
    w = 0.05 * torch.randn(2, 32 * 31 // 2)
    x = torch.randn(3, 64)
    with ops.use_backend("triton"):
        F.oft_linear(x, qt, w, 32)
    assert len(rotations) == 1 and len(seen) == 1
    torch.testing.assert_close(seen[0], reference.oft_rotate(x, reference.oft_rotation(w, 32), False))


def _skew_params(blocks, block_size, dtype=torch.float32):
    return (0.05 * torch.randn(blocks, block_size * (block_size - 1) // 2)).to(dtype)


@pytest.mark.parametrize("block_size", [8, 32])
@pytest.mark.parametrize("terms", [2, 3, 5, 8])
def test_triton_rotation_build_and_backward_match_reference(block_size, terms):
    params = _skew_params(3, block_size).requires_grad_()
    want = reference.oft_rotation(params, block_size, terms)
    grad_rot = torch.randn_like(want)
    (want * grad_rot).sum().backward()
    with ops.use_backend("triton"):
        got = ops.oft_rotation(params.detach(), block_size, terms)
        got_grad = ops.oft_rotation_backward(params.detach(), grad_rot, block_size, terms)
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, params.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 8])
def test_closed_form_rotation_grad_equals_autograd(terms):
    params = _skew_params(4, 16, torch.float64).requires_grad_()
    grad_rot = torch.randn(4, 16, 16, dtype=torch.float64)
    if terms > 1:
        (reference.oft_rotation(params, 16, terms) * grad_rot).sum().backward()
    want = params.grad if terms > 1 else torch.zeros_like(params)
    got = reference.oft_rotation_params_grad(params.detach(), grad_rot, 16, terms)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("block_size", [8, 32])
@pytest.mark.parametrize("m", [1, 37, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_fused_rotation_backward_matches_reference(block_size, m, dtype):
    x = torch.randn(m, 3 * block_size).to(dtype)
    grad = torch.randn(m, 3 * block_size).to(dtype)
    rot = reference.oft_rotation(_skew_params(3, block_size), block_size)
    with ops.use_backend("triton"):
        grad_x, grad_rot = ops.oft_rotate_backward(x, grad, rot)
    assert grad_x.dtype == dtype and grad_rot.dtype == torch.float32
    # grad_x: same fp32 sums rounded once (a rare last-bit flip in bf16); dR: fp32 summation order.
    tol = 2**-8 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(grad_x, reference.oft_rotate(grad, rot, True), rtol=tol, atol=tol)
    want = reference.oft_rotation_grad(x, grad, 3, block_size)
    exact = reference.oft_rotation_grad(x.double(), grad.double(), 3, block_size)
    assert_as_accurate_as_reference([grad_rot], [want], [exact], ["dR"])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck_oft_ops(backend):
    x, grad = torch.randn(5, 32), torch.randn(5, 32)
    params = _skew_params(2, 16)
    rot = reference.oft_rotation(params, 16)
    with ops.use_backend(backend):
        torch.library.opcheck(torch.ops.qft.oft_rotate.default, (x, rot, False))
        torch.library.opcheck(torch.ops.qft.oft_rotate_backward.default, (x, grad, rot))
        torch.library.opcheck(torch.ops.qft.oft_rotation.default, (params, 16, 5))
        torch.library.opcheck(torch.ops.qft.oft_rotation_backward.default, (params, rot, 16, 5))


@pytest.mark.parametrize("transpose", [False, True])
def test_rotate_op_gradcheck_float64(transpose):
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    rot = reference.oft_rotation(_skew_params(2, 8, torch.float64), 8).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, r: ops.oft_rotate(x, r, transpose), (x, rot))


def test_rotation_op_gradcheck_float64():
    params = _skew_params(3, 8, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: ops.oft_rotation(p, 8, 5), (params,))


def test_triton_oft_linear_backward_matches_reference():
    # The whole Triton path: R built by its kernel, rotation, decode + GEMM, fused rotation backward.
    # (A fixed atol of 1e-5 on grad x flipped with the interpreter's summation order: the bound is now
    # the fp32 reference's own error against fp64.)
    qt = qft.quantize(torch.randn(48, 128), "nf4", 64)
    w0 = _skew_params(4, 32)
    x0 = torch.randn(40, 128)

    def grads(dtype, triton):
        w, x = w0.to(dtype).clone().requires_grad_(), x0.to(dtype).clone().requires_grad_()
        with ops.use_backend("triton") if triton else contextlib.nullcontext():
            F.oft_linear(x, qt, w, 32).square().sum().backward()
        return [x.grad, w.grad]

    assert_as_accurate_as_reference(
        grads(torch.float32, True), grads(torch.float32, False), grads(torch.float64, False), ["grad x", "grad w"]
    )


def test_oft_over_an_act_order_layer_rotates_the_original_feature_order():
    torch.manual_seed(0)
    dense = torch.randn(32, 64)
    perm = torch.randperm(64)
    # An act-order import stores the weight's columns in perm order and permutes x to match.
    layer = qft.nn.QuantLinear(qft.quantize(dense[:, perm], "int4", 32), input_perm=perm)
    plain_w = layer.dequantize(torch.float32)
    model = torch.nn.Sequential(layer)
    qft.add_adapters(model, qft.OFTConfig(block_size=16, target_modules=("0",)))
    torch.nn.init.normal_(model[0].oft_R.weight, std=0.05)
    x = torch.randn(3, 64)
    rot = model[0].rotation().detach()
    want = reference.oft_rotate(x, rot) @ plain_w.t()
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="re-quantizes"):
        qft.merge_adapters(model)
    merged = model[0].base_layer.dequantize(torch.float32)
    ideal = plain_w @ torch.block_diag(*rot).t()
    # Re-quantized: closer to W R^T than the unrotated weight is, and the output follows the merge.
    assert (merged - ideal).abs().mean() < 0.5 * (plain_w - ideal).abs().mean()
    torch.testing.assert_close(model(x), x @ merged.t(), rtol=1e-5, atol=1e-5)


def test_blocks_beyond_the_triton_limit_take_the_torch_path():
    b = 2 * ops.oft.TRITON_MAX_BLOCK
    params = _skew_params(1, b)
    x, grad = torch.randn(3, b), torch.randn(3, b)
    rot = reference.oft_rotation(params, b)
    with ops.use_backend("triton"):
        assert torch.equal(ops.oft_rotation(params, b, 5), rot)
        assert torch.equal(ops.oft_rotate(x, rot, False), reference.oft_rotate(x, rot))
        grad_x, grad_rot = ops.oft_rotate_backward(x, grad, rot)
    assert torch.equal(grad_x, reference.oft_rotate(grad, rot, True))
    assert torch.equal(grad_rot, reference.oft_rotation_grad(x, grad, 1, b))


@pytest.mark.parametrize("block_size", [12, 24])
def test_blocks_that_are_not_powers_of_two_take_the_torch_path(block_size):
    layer = qft.nn.OFTLinear(torch.nn.Linear(48, 16), qft.OFTConfig(block_size=block_size, target_modules=("x",)))
    qft_layer = qft.nn.OFTLinear(
        qft.nn.QuantLinear.from_linear(torch.nn.Linear(48, 16)),
        qft.OFTConfig(block_size=block_size, target_modules=("x",)),
    )
    x = torch.randn(5, 48)
    for module in (layer, qft_layer):
        torch.nn.init.normal_(module.oft_R.weight, std=0.05)
        want = module(x)
        with ops.use_backend("triton"):
            got = module(x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _counted_rotations(monkeypatch):
    from qft.adapters.oft import function

    calls = []
    real = function.oft_ops.rotation
    monkeypatch.setattr(function.oft_ops, "rotation", lambda *a: calls.append(1) or real(*a))
    return calls


def _fresh_rotation(layer):
    """R built from a copy of the layer's parameters (nothing cached for them)."""
    from qft.adapters.oft.function import oft_rotation

    c = layer.config
    params = layer.oft_R.weight.detach().clone()
    return oft_rotation(params, c.block_size, layer.blocks, c.cayley_neumann_terms, c.use_cayley_neumann)


def _fresh_output(layer, x):
    """The layer's output with R built from a copy of its parameters (nothing cached for them)."""
    base = layer.base_layer
    return F.oft_linear(x, base.quantized, layer.oft_R.weight.detach().clone(), 16, base.bias)


def test_no_grad_forwards_reuse_r_until_the_parameters_change(monkeypatch):
    _, ours = oft_twins(TwoLayer(), torch.float32, 16)
    layer, x = ours.fc1, torch.randn(4, 64)
    calls = _counted_rotations(monkeypatch)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first) and len(calls) == 1  # built once, reused
        layer.oft_R.weight.add_(0.01)  # an in-place write (an optimizer step): built again
        moved = layer(x)
    assert len(calls) == 2 and not torch.equal(moved, first)
    assert torch.equal(moved, _fresh_output(layer, x))
    # A write no version counter sees (qft's optimizer kernels write through raw pointers) rebuilds R too.
    layer.oft_R.weight.detach().numpy()[0, 0] += 0.5
    before = len(calls)
    with torch.no_grad():
        assert torch.equal(layer(x), _fresh_output(layer, x))
    assert len(calls) == before + 2  # the layer's R and the fresh copy's
    # A replaced .data (another dtype round trip: other values) is a different tensor, never the cached R.
    layer.oft_R.weight.data = layer.oft_R.weight.data.bfloat16().float()
    before = len(calls)
    with torch.no_grad():
        rounded = layer(x)
    assert len(calls) == before + 1
    assert torch.equal(rounded, _fresh_output(layer, x))


def test_r_is_built_afresh_where_a_graph_or_inference_mode_needs_it(monkeypatch):
    _, ours = oft_twins(TwoLayer(), torch.float32, 16)
    layer, x = ours.fc1, torch.randn(4, 64)
    calls = _counted_rotations(monkeypatch)
    with torch.no_grad():
        layer(x)
    layer(x).sum().backward()  # training: R must be in the graph, so built again, and the gradient flows
    assert len(calls) == 2 and layer.oft_R.weight.grad is not None
    with torch.inference_mode():
        layer(x)
        layer(x)
    assert len(calls) == 4
    layer(x).sum().backward()  # nothing built under inference mode is reused by a graph
    assert len(calls) == 5
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):  # products rounded to bf16: built, never kept
            rounded = layer.rotation()
        exact = layer.rotation()  # the fp32 R kept by the first no-grad call (the parameters are unchanged)
    assert len(calls) == 6 and not torch.equal(rounded, exact)
    assert torch.equal(exact, _fresh_rotation(layer))
