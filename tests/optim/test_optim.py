"""qft.optim: PagedAdamW (32-bit), AdamW8bit, PagedAdamW8bit on CPU."""

import contextlib
import copy

import pytest
import torch

from qft.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit


def _params(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(64, 96).to(dtype), torch.randn(5000).to(dtype), torch.randn(7, 3, 5).to(dtype)]


def _run(optimizer_cls, params, steps=50, **kwargs):
    params = [p.clone().requires_grad_() for p in params]
    opt = optimizer_cls(params, lr=1e-2, weight_decay=0.1, **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype)  # same draws on every device
        opt.step()
    return params, opt


def test_32bit_equals_torch_adamw_on_fp32():
    ours, _ = _run(PagedAdamW, _params())
    theirs, _ = _run(torch.optim.AdamW, _params())
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_maximize_and_tensor_lr_follow_torch():
    params = _params()
    ours, _ = _run(lambda ps, **kw: PagedAdamW(ps, **{**kw, "lr": torch.tensor(1e-2)}, maximize=True), params, 10)
    theirs, _ = _run(
        lambda ps, **kw: torch.optim.AdamW(ps, **{**kw, "lr": torch.tensor(1e-2)}, maximize=True), params, 10
    )
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_bf16_params_are_closer_to_float64_adamw_than_torch():
    # torch keeps bf16 moments for bf16 parameters; qft keeps fp32 moments (32-bit state).
    exact, _ = _run(torch.optim.AdamW, _params(torch.float64))
    ours, _ = _run(PagedAdamW, _params(torch.bfloat16))
    theirs, _ = _run(torch.optim.AdamW, _params(torch.bfloat16))
    for e, o, t in zip(exact, ours, theirs, strict=True):
        assert o.dtype == torch.bfloat16
        assert (o.double() - e).norm() <= (t.double() - e).norm()


def test_8bit_tracks_32bit():
    full, _ = _run(PagedAdamW, _params())
    eight, opt = _run(PagedAdamW8bit, _params())
    big = opt.state[eight[0]]
    assert big["exp_avg"].dtype == torch.uint8 and big["exp_avg_sq"].dtype == torch.uint8
    assert opt.state[eight[2]]["exp_avg"].dtype == torch.float32, "tensors under 4096 elements keep fp32 state"
    for f, e in zip(full, eight, strict=True):
        assert ((f - e).norm() / f.norm()) < 0.02


def test_8bit_trains_like_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    losses = {}
    for name, cls in (("qft", AdamW8bit), ("bnb", bnb.optim.AdamW8bit)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8))
        x, y = torch.randn(256, 64), torch.randn(256, 8)
        opt = cls(model.parameters(), lr=3e-3)
        for _ in range(150):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[name] = loss.item()
    assert losses["qft"] < 0.5
    assert abs(losses["qft"] - losses["bnb"]) < 0.05 * losses["bnb"] + 0.01


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_state_dict_round_trip_continues_bit_identically(cls):
    params, opt = _run(cls, _params(), steps=10)
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    g = torch.Generator().manual_seed(7)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(5)]
    for step in grads:
        for p, grad in zip(params, step, strict=True):
            p.grad = grad.clone()
        opt.step()
    resumed = [p.clone().requires_grad_() for p in saved_params]
    opt2 = cls(resumed, lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(saved_state)
    for step in grads:
        for p, grad in zip(resumed, step, strict=True):
            p.grad = grad.clone()
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(params, resumed, strict=True))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1"),
        ({"betas": (-0.1, 0.9)}, "Invalid beta parameter at index 0"),
        ({"eps": -1e-8}, "Invalid epsilon"),
        ({"weight_decay": -0.1}, "Invalid weight_decay"),
        ({"optim_bits": 16}, "optim_bits must be 32 or 8"),
    ],
)
def test_bad_arguments_get_torch_style_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedAdamW([torch.zeros(3, requires_grad=True)], **kwargs)


def test_foreign_or_mismatched_state_dict_leaves_optimizer_unchanged():
    _, opt = _run(PagedAdamW8bit, _params(), steps=3)
    before = copy.deepcopy(opt.state_dict())
    sgd = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="has 1 parameters, this optimizer has 3"):
        opt.load_state_dict(sgd.state_dict())
    _, other = _run(PagedAdamW8bit, [torch.randn(64, 80), torch.randn(5000), torch.randn(7, 3, 5)], steps=3)
    with pytest.raises(ValueError, match=r"state of parameter 0: 'exp_avg' is \(5120,\)"):
        opt.load_state_dict(other.state_dict())
    _, fp32 = _run(PagedAdamW, _params(), steps=3)
    with pytest.raises(ValueError, match="entries"):
        opt.load_state_dict(fp32.state_dict())
    after = opt.state_dict()
    for key, state in before["state"].items():
        assert all(torch.equal(v, after["state"][key][k]) for k, v in state.items())


def test_paging_on_cpu_is_a_no_op_with_one_warning():
    _, opt = _run(PagedAdamW8bit, _params(), steps=2)
    state = copy.deepcopy(opt.state_dict())
    with pytest.warns(UserWarning, match="no-op for CPU"):
        opt.page_out()
    opt.page_in()
    assert all(
        torch.equal(v, opt.state_dict()["state"][k][name]) for k, s in state["state"].items() for name, v in s.items()
    )


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_gpu_paged_step_matches_cpu_and_survives_page_out(cls):
    from qft.optim import paging

    cpu, _ = _run(cls, _params(), steps=5)
    gpu_params = [p.cuda() for p in _params()]
    gpu, opt = _run(cls, gpu_params, steps=5)
    # The GPU runs the fused kernel (IEEE sqrt; torch's CPU sqrt is not): ulps apart, and with 8-bit
    # state such an ulp can move a moment to the next code now and then.
    tol = 1e-5 if cls is PagedAdamW else 1e-3
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=tol, atol=tol)
    before = {id(v): v.clone() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)}
    opt.page_out()
    torch.cuda.synchronize()
    opt.page_in()
    torch.cuda.synchronize()
    for s in opt.state.values():
        for v in s.values():
            if isinstance(v, torch.Tensor) and id(v) in before:
                assert torch.equal(v.cpu(), before[id(v)].cpu())
    if paging.available():
        t = paging.managed_zeros((1 << 20,), torch.float32, torch.device("cuda"))
        t += 1
        paging.prefetch(t, to_host=True)
        paging.prefetch(t, to_host=False)
        assert float(t.sum()) == float(1 << 20)


def _fused_vs_torch_ops(cls, dtype, steps=6, **kwargs):
    from qft import ops

    params = [*_params(dtype), torch.randn(300).to(dtype)]  # tails: 5000 and 300 are not whole chunks
    kwargs = {"min_8bit_size": 300, **kwargs}
    plain, plain_opt = _run(cls, params, steps, **kwargs)
    with ops.use_backend("triton"):
        fused, fused_opt = _run(cls, params, steps, **kwargs)
    return plain, plain_opt, fused, fused_opt


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_triton_step_matches_the_torch_ops_step(cls, dtype):
    plain, plain_opt, fused, fused_opt = _fused_vs_torch_ops(cls, dtype)
    for a, b in zip(plain, fused, strict=True):
        # The moments do not depend on the parameters: bit-identical (fp32 or 8-bit codes and absmax).
        sa, sb = plain_opt.state[a], fused_opt.state[b]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), "state differs"
        # The parameters differ only where torch's CPU sqrt (vectorized, not correctly rounded) is an
        # ulp off the kernel's IEEE sqrt: a few fp32 ulps after 6 steps, one bf16 rounding at most.
        ulp = 2**-7 if dtype == torch.bfloat16 else 2**-22
        torch.testing.assert_close(b, a, rtol=ulp, atol=ulp * a.abs().max().item())


def test_fused_step_takes_maximize_and_a_tensor_lr():
    plain, _, fused, _ = _fused_vs_torch_ops(PagedAdamW, torch.float32, maximize=True)
    kw = {"lr": torch.tensor(1e-2)}
    plain_t, _, fused_t, _ = _fused_vs_torch_ops(lambda ps, **k: PagedAdamW(ps, **{**k, **kw}), torch.float32)
    for a, b in zip(plain + plain_t, fused + fused_t, strict=True):
        torch.testing.assert_close(b, a, rtol=2**-22, atol=2**-22 * a.abs().max().item())


def test_fused_step_is_one_launch_per_parameter_dtype(monkeypatch):
    from qft import ops
    from qft.kernels import adamw

    launches = []
    real = adamw.LaunchPlan.launch
    monkeypatch.setattr(adamw.LaunchPlan, "launch", lambda plan, *a: launches.append(plan.size) or real(plan, *a))
    params = [p.requires_grad_() for p in [*_params(), torch.randn(40, 8, dtype=torch.bfloat16)]]
    opt = PagedAdamW8bit(params)
    for p in params:
        p.grad = torch.ones_like(p)
    with ops.use_backend("triton"):
        opt.step()
    # Three fp32 tensors (two with 8-bit state, one too small for it) in one launch; the bf16 one in another.
    assert sorted(launches) == [1, 3]


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
def test_gpu_step_never_synchronizes_with_the_host(cls):
    params = [p.cuda().requires_grad_() for p in _params()]
    opt = cls(params, lr=torch.tensor(1e-2, device="cuda"))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step allocates the state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_32bit_step_is_within_one_ulp_of_torch_adamw():
    ours, _ = _run(PagedAdamW, [p.cuda() for p in _params()])
    theirs, _ = _run(lambda ps, **kw: torch.optim.AdamW(ps, foreach=False, **kw), [p.cuda() for p in _params()])
    for a, b in zip(ours, theirs, strict=True):
        ulps = (a - b).abs() / torch.finfo(torch.float32).eps / b.abs().clamp(min=torch.finfo(torch.float32).tiny)
        assert ulps.max().item() <= 1.0, f"{ulps.max().item():.1f} ulps after 50 steps"


@pytest.mark.parametrize("signed", [True, False])
def test_table_lookup_codes_equal_bucketize(signed):
    from qft.formats import moments8

    mids = moments8._midpoints(signed, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    uniform = torch.rand(200_000, generator=g) * (2 if signed else 1) - (1 if signed else 0)
    tiny = torch.randn(50_000, generator=g).mul(1e-4).clamp(-1, 1)
    edges = torch.tensor([0.0, -0.0, 1.0, 1e-30, 1e-38, 1e-45, -1.0, -1e-30, -1e-45])
    x = torch.cat(
        [
            uniform,
            tiny if signed else tiny.abs(),
            mids,
            torch.nextafter(mids, torch.tensor(2.0)),
            torch.nextafter(mids, torch.tensor(-2.0)),
            edges if signed else edges.abs(),
        ]
    )
    assert torch.equal(moments8.nearest_codes(x, signed), torch.bucketize(x, mids))


def test_fused_step_reuses_its_launch_plan_while_nothing_moves(monkeypatch):
    from qft import ops
    from qft.kernels import adamw

    built = []
    real_init = adamw.LaunchPlan.__init__
    monkeypatch.setattr(adamw.LaunchPlan, "__init__", lambda plan, entries: built.append(1) or real_init(plan, entries))
    params = [p.requires_grad_() for p in _params()]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = PagedAdamW8bit(params, lr=1e-2, min_8bit_size=300)
    g = torch.Generator().manual_seed(1)
    with ops.use_backend("triton"):
        for _ in range(4):
            for p in params:
                p.grad.copy_(torch.randn(p.shape, generator=g))  # gradients written in place
            opt.step()
        assert len(built) == 1
        params[1].grad = params[1].grad.clone()  # a gradient at a new address: the plan is rebuilt
        opt.step()
    assert len(built) == 2
    assert all(float(opt.state[p]["step"]) == 5 for p in params)


def test_fused_step_with_a_missing_gradient_matches_the_torch_ops_step():
    from qft import ops

    def run(fused):
        params = [p.clone().requires_grad_() for p in _params()]
        opt = PagedAdamW(params, lr=1e-2, weight_decay=0.1)
        g = torch.Generator().manual_seed(1)
        with ops.use_backend("triton") if fused else contextlib.nullcontext():
            for step in range(5):
                for i, p in enumerate(params):  # the second tensor has no gradient on steps 1 and 2
                    p.grad = None if i == 1 and step in (1, 2) else torch.randn(p.shape, generator=g)
                opt.step()
        return params, [float(opt.state[p]["step"]) for p in params]

    (plain, plain_steps), (fused, fused_steps) = run(False), run(True)
    assert plain_steps == fused_steps == [5.0, 3.0, 5.0]
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=2**-22, atol=2**-22 * a.abs().max().item())


def test_page_in_refuses_more_state_than_the_gpu_has_free(monkeypatch):
    from qft.optim import paging

    state = [torch.zeros(50), torch.zeros(10)]  # 240 bytes
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 10_000))
    paging.check_fits(state)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (200, 10_000))
    with pytest.raises(MemoryError, match="240 bytes of optimizer state"):
        paging.check_fits(state)
