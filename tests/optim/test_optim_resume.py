"""Optimizer resume: state keeps its own dtypes through state_dict / load_state_dict, twice in a row,
for every parameter dtype, 32- and 8-bit state, reference and fused Triton step; wrong state is
refused before any kernel reads it."""

import contextlib
import copy

import pytest
import torch

from qft import ops
from qft.optim import PagedAdamW, PagedAdamW8bit

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _params(dtype):
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(64, 96, generator=g).to(dtype).requires_grad_(),
        torch.randn(300, generator=g).to(dtype).requires_grad_(),
    ]


def _steps(opt, params, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()


def _backend(fused):
    return ops.use_backend("triton") if fused else contextlib.nullcontext()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit])
@pytest.mark.parametrize("fused", [False, True])
def test_resume_twice_continues_bit_identically(dtype, cls, fused):
    kw = {"lr": 1e-2, "min_8bit_size": 300}
    with _backend(fused):
        straight = _params(dtype)
        opt = cls(straight, **kw)
        _steps(opt, straight, 3, seed=1)
        _steps(opt, straight, 2, seed=2)
        _steps(opt, straight, 2, seed=3)

        resumed = _params(dtype)
        first = cls(resumed, **kw)
        _steps(first, resumed, 3, seed=1)
        saved = copy.deepcopy(first.state_dict())
        second = cls(resumed, **kw)  # a new process would build a new optimizer
        second.load_state_dict(saved)
        _steps(second, resumed, 2, seed=2)
        third = cls(resumed, **kw)
        third.load_state_dict(copy.deepcopy(second.state_dict()))  # the second round trip
        _steps(third, resumed, 2, seed=3)

    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)
    for p, q in zip(straight, resumed, strict=True):
        want, got = opt.state[p], third.state[q]
        assert set(want) == set(got)
        for name, value in want.items():
            assert got[name].dtype == (torch.float32 if name == "step" else value.dtype), name
            assert torch.equal(got[name], value), name
    assert {v.dtype for s in third.state.values() for k, v in s.items() if k.endswith("absmax")} <= {torch.float32}


def test_loaded_state_is_a_copy_not_the_callers_tensors():
    params = _params(torch.float32)
    opt = PagedAdamW(params, lr=1e-2)
    _steps(opt, params, 1, seed=1)
    saved = opt.state_dict()
    fresh = PagedAdamW(params, lr=1e-2)
    fresh.load_state_dict(saved)
    for key, state in saved["state"].items():
        assert fresh.state[params[key]]["exp_avg"].data_ptr() != state["exp_avg"].data_ptr()


@pytest.mark.parametrize("fused", [False, True])
def test_state_of_the_wrong_dtype_never_reaches_a_step(fused):
    params = _params(torch.bfloat16)
    opt = PagedAdamW8bit(params, lr=1e-2, min_8bit_size=300)
    with _backend(fused):
        _steps(opt, params, 1, seed=1)
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][0]["exp_avg"] = bad["state"][0]["exp_avg"].float()  # what torch's cast used to leave
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"state of parameter 0: 'exp_avg' is \(6144,\) torch.float32"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert all(torch.equal(v, after["state"][k][n]) for k, s in before["state"].items() for n, v in s.items())
    # State swapped in behind the optimizer's back is refused by the step itself, before any launch.
    opt.state[params[1]]["exp_avg_sq"] = torch.zeros(300, dtype=torch.float64)
    with _backend(fused), pytest.raises((ValueError, RuntimeError)):
        _steps(opt, params, 1, seed=2)


@pytest.mark.parametrize("step", [float("nan"), -1.0, 2.5, torch.tensor([1.0, 2.0]), "3"])
def test_malformed_step_is_refused_with_a_message(step):
    params = _params(torch.float32)
    opt = PagedAdamW(params, lr=1e-2)
    _steps(opt, params, 1, seed=1)
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][1]["step"] = step
    with pytest.raises(ValueError, match="'step' must be a whole number"):
        opt.load_state_dict(bad)


def test_malformed_state_dicts_are_refused_with_a_message():
    params = _params(torch.float32)
    opt = PagedAdamW(params, lr=1e-2)
    _steps(opt, params, 1, seed=1)
    good = opt.state_dict()
    for bad, match in [
        ({"state": {}}, "param_groups and state"),
        ({"state": [], "param_groups": good["param_groups"]}, "param_groups and state"),
        ({"state": {}, "param_groups": [{"lr": 1.0}]}, "'params' list"),
        ({"state": {0: "x"}, "param_groups": good["param_groups"]}, "must be a dict"),
        ({"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": good["param_groups"]}, "has entries"),
    ]:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)


@pytest.mark.parametrize("fused", [False, True])
def test_one_nan_gradient_costs_one_value_not_a_block(fused):
    # torch's AdamW (and bitsandbytes' 8-bit AdamW on CPU) lose the one parameter whose gradient was NaN.
    p = torch.randn(4096).requires_grad_()
    opt = PagedAdamW8bit([p], lr=1e-3, min_8bit_size=16)
    g = torch.Generator().manual_seed(1)
    with _backend(fused):
        for step in range(3):
            p.grad = torch.randn(4096, generator=g)
            if step == 1:
                p.grad[10] = float("nan")
            opt.step()
    assert torch.isnan(p.detach()).nonzero().flatten().tolist() == [10]
    state = opt.state[p]
    assert all(torch.isfinite(state[k]).all() for k in ("exp_avg_absmax", "exp_avg_sq_absmax"))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32])
def test_parameters_that_are_not_real_floats_are_refused(dtype):
    p = torch.zeros(8, dtype=dtype)
    p.grad = torch.ones(8, dtype=dtype)
    opt = PagedAdamW([p], lr=1e-2)
    with pytest.raises(TypeError, match=f"real floating parameters, got {dtype}"):
        opt.step()
    assert torch.equal(p, torch.zeros(8, dtype=dtype)) and not opt.state[p]
