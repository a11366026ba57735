"""AdamW with 32-bit or 8-bit state, optionally paged: ``PagedAdamW``, ``AdamW8bit``, ``PagedAdamW8bit``.

The update follows ``torch.optim.AdamW`` op for op (decoupled weight decay, bias-corrected moments,
``maximize``, a tensor ``lr``; ``qft.ops.adamw``), so 32-bit state reproduces torch's results on fp32
parameters. On a GPU the step is one Triton launch per (parameter dtype, gradient dtype) over every
tensor, fed by tables copied asynchronously: ``step`` never waits for the device. With 8-bit state
each moment is kept blockwise-quantized (``qft.formats.moments8``); tensors smaller than
``min_8bit_size`` keep fp32 state. Paged state on a GPU lives in managed memory when the CUDA
extension is built (``page_out`` prefetches it to the host, ``page_in`` back), else it is copied to
pinned host memory and back; ``step`` pages in by itself. On CPU paging is a no-op. DTensor
parameters (FSDP2) update their local shard, and their state covers that shard only (8-bit or not
is decided by the whole tensor's size; the 8-bit blocks follow the shard).
"""

from __future__ import annotations

import math
import warnings

import torch

from qft.formats import moments8
from qft.ops import adamw as adamw_op
from qft.ops.dispatch import GPU_BACKENDS, backend_for
from qft.optim import paging

# State entries the fused kernel reads (the absmax pair only with 8-bit state).
_STATE_NAMES = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")

_CPU_PAGING_WARNED = False


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameters and gradients); other tensors as they are."""
    return (
        t if type(t) is torch.Tensor or type(t) is torch.nn.Parameter else t.to_local() if hasattr(t, "to_local") else t
    )


def _check_hyper(lr, betas, eps, weight_decay) -> None:
    value = float(lr) if isinstance(lr, torch.Tensor) else lr
    if not 0.0 <= value:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (torch's semantics and arguments) with ``optim_bits`` 32 or 8 state, paged by default.

    Args:
        params: iterable of parameters or parameter groups.
        lr, betas, eps, weight_decay, maximize: as ``torch.optim.AdamW`` (``lr`` may be a tensor).
        optim_bits: 32 (fp32 moments) or 8 (blockwise 8-bit moments).
        paged: keep the state pageable (``page_out``/``page_in``); a no-op on CPU.
        min_8bit_size: tensors with fewer elements keep fp32 state even when ``optim_bits`` is 8.
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        maximize=False,
        optim_bits=32,
        paged=True,
        min_8bit_size=4096,
    ):
        _check_hyper(lr, betas, eps, weight_decay)
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 32 or 8, got {optim_bits!r}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "maximize": maximize}
        super().__init__(params, defaults)
        self.optim_bits, self.paged, self.min_8bit_size = optim_bits, paged, min_8bit_size
        self._paged_out = False
        self._plans: dict[tuple, object] = {}  # (device, param dtype, grad dtype) -> LaunchPlan of the last step
        self._state_version = 0  # bumped whenever state tensors are created or replaced: plans are rebuilt

    def _eight_bit(self, p: torch.Tensor) -> bool:
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _managed(self, p: torch.Tensor) -> bool:
        return self.paged and p.is_cuda and paging.available()

    def _zeros(self, shape, dtype, p: torch.Tensor) -> torch.Tensor:
        if self._managed(p):
            return paging.managed_zeros(shape, dtype, p.device)
        return torch.zeros(shape, dtype=dtype, device=p.device)

    def _state_spec(self, p: torch.Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each state tensor of ``p``: fp32 moments, or 8-bit codes with fp32 block
        scales (8-bit or not by the whole tensor; the shapes are this rank's shard of a DTensor)."""
        eight, local = self._eight_bit(p), _local(p)
        if eight:
            blocks = -(-local.numel() // moments8.BLOCK)
            codes, absmax = ((local.numel(),), torch.uint8), ((blocks,), torch.float32)
            return {"exp_avg": codes, "exp_avg_sq": codes, "exp_avg_absmax": absmax, "exp_avg_sq_absmax": absmax}
        moments = (tuple(local.shape), torch.float32)
        return {"exp_avg": moments, "exp_avg_sq": moments}

    def _init_state(self, p: torch.Tensor) -> dict:
        local = _local(p)
        state = {"step": torch.tensor(0.0)}
        state.update({name: self._zeros(shape, dtype, local) for name, (shape, dtype) in self._state_spec(p).items()})
        if "exp_avg_absmax" in state:  # 8-bit: every code is the code of a zero moment (its block's absmax is 0)
            for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                state[name].fill_(int(moments8.quantize(torch.zeros(1), signed)[0][0]))
        return state

    def _check_state(self, p: torch.Tensor, state: dict, where: str) -> None:
        """``ValueError`` unless every state tensor has the shape and dtype of ``_state_spec``: the fused
        kernel reads them through raw fp32 / uint8 addresses, so nothing else may reach it."""
        spec = self._state_spec(p)
        names = set(state) - {"step", "_device"}
        if names != set(spec) or "step" not in state:
            raise ValueError(f"{where} has entries {sorted(state)}, expected {sorted([*spec, 'step'])}")
        for name, (shape, dtype) in spec.items():
            got = state[name]
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != shape or got.dtype != dtype:
                what = f"{tuple(got.shape)} {got.dtype}" if isinstance(got, torch.Tensor) else type(got).__name__
                raise ValueError(f"{where}: {name!r} is {what}, expected {shape} {dtype}")
        step = state["step"]
        scalar = isinstance(step, (int, float)) or (isinstance(step, torch.Tensor) and step.numel() == 1)
        value = float(step) if scalar else math.nan
        if not math.isfinite(value) or value < 0 or value != int(value):
            raise ValueError(f"{where}: 'step' must be a whole number of steps, got {step!r}")

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter with a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._paged_out:
            self.page_in()
        fused: dict[tuple, list[tuple]] = {}
        backends: dict[torch.device, str] = {}  # this loop runs per tensor: look each device up once
        for index, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            lr, eps, wd, maximize = group["lr"], group["eps"], group["weight_decay"], group["maximize"]
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    if not p.is_floating_point():  # complex would lose its imaginary part, integers can't step
                        raise TypeError(f"{type(self).__name__} updates real floating parameters, got {p.dtype}")
                    state.update(self._init_state(p))
                    self._state_version += 1
                param, grad = _local(p), _local(grad)  # a DTensor (FSDP2) updates its local shard
                device = param.device
                if device not in backends:
                    backends[device] = backend_for(device)
                fusable = backends[device] != "reference" and adamw_op.fusable(param, grad)
                if fusable and backends[device] in GPU_BACKENDS:
                    fused.setdefault((param.device, param.dtype, grad.dtype), []).append((index, p, param, grad, state))
                    continue
                self._check_state(p, state, f"optimizer state of a {tuple(p.shape)} parameter")
                # The CPU kernel takes 8-bit state; fp32 state stays on torch's ops, equal to torch.optim.AdamW.
                kernel = fusable and "exp_avg_absmax" in state and device.type == "cpu"
                step = adamw_op.cpu_step if kernel else adamw_op.reference_step
                step(param, grad, state, lr, beta1, beta2, eps, wd, maximize)
        for key, members in fused.items():  # one launch per (device, param dtype, grad dtype)
            self._fused_step(key, members)
        return loss

    def _fused_step(self, key: tuple, members: list[tuple]) -> None:
        """Advance ``members`` ((group index, parameter, its local tensor, grad, state)) by one fused
        launch, reusing the launch plan of the last step while the same tensors sit at the same
        addresses (the usual case)."""
        device = key[0]
        device_lrs = {}  # group index -> fp32 lr on the device, for tensor learning rates that live there
        for index in {m[0] for m in members}:
            lr = self.param_groups[index]["lr"]
            if isinstance(lr, torch.Tensor) and lr.device.type != "cpu":
                device_lrs[index] = lr.to(device, torch.float32)
        # The plan keeps addresses, not tensors (holding last step's gradients would keep their memory
        # and move the next ones elsewhere): it is reused only while every address is the same.
        signature = [self._state_version, *((i, t.data_ptr()) for i, t in sorted(device_lrs.items()))]
        for _, _, param, grad, state in members:  # exp_avg: state replaced behind the optimizer's back
            signature += (param.data_ptr(), grad.data_ptr(), state["exp_avg"].data_ptr())
        plan = self._plans.get(key)
        if plan is None or plan.signature != signature:
            entries = []
            for index, p, param, grad, state in members:
                self._check_state(p, state, f"optimizer state of a {tuple(p.shape)} parameter")
                entry = {name: state[name] for name in _STATE_NAMES if name in state}
                entry.update(param=param, grad=grad, lr=device_lrs.get(index))
                entries.append(entry)
            plan = adamw_op.LaunchPlan(entries)
            plan.signature = signature
            # Each state's "step" stays a CPU fp32 scalar tensor (torch.optim.AdamW's convention, so
            # checkpoints load either way), but a view into one tensor per plan: one add per step.
            plan.steps = torch.tensor([float(state["step"]) for *_, state in members], dtype=torch.float32)
            for i, (*_, state) in enumerate(members):
                state["step"] = plan.steps[i]
            # Tensors that share a group and a step count share a scalar row (usually all of them).
            combos = sorted({(index, float(state["step"])) for index, *_, state in members})
            plan.combos = combos
            plan.row_of = torch.tensor([combos.index((index, float(state["step"]))) for index, *_, state in members])
            self._plans[key] = plan
        plan.steps.add_(1.0)
        plan.combos = [(index, step + 1) for index, step in plan.combos]
        rows = []
        for index, step in plan.combos:
            group = self.param_groups[index]
            lr = group["lr"]
            host_lr = lr.item() if isinstance(lr, torch.Tensor) and index not in device_lrs else lr
            rows.append(
                adamw_op.host_scalars(
                    host_lr, *group["betas"], group["eps"], group["weight_decay"], group["maximize"], step
                )
            )
        plan.launch(torch.tensor(rows, dtype=torch.float32)[plan.row_of], moments8.tables(device))

    def _state_tensors(self):
        for state in self.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    yield state, key, value

    def page_out(self) -> None:
        """Move the whole optimizer state to host memory (managed pages prefetched to the host, or a
        pinned copy); a no-op for CPU parameters."""
        if not self._has_gpu_state():
            _warn_cpu_paging()
            return
        if self.paged and paging.available():
            for _, _, value in self._state_tensors():
                paging.prefetch(value, to_host=True)
            self._paged_out = True
            return
        for state, key, value in list(self._state_tensors()):
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            state[key] = host
            state.setdefault("_device", value.device)
        self._state_version += 1
        self._paged_out = True

    def page_in(self) -> None:
        """Bring paged-out state back to its parameters' device (``step`` does this by itself).
        ``MemoryError`` (nothing moved) when the GPU has less free memory than the state needs."""
        if self.paged and paging.available() and self._has_gpu_state():
            on_gpu = [value for _, _, value in self._state_tensors() if value.is_cuda]
            paging.check_fits(on_gpu)  # prefetching more than is free would oversubscribe the GPU
            for value in on_gpu:
                paging.prefetch(value, to_host=False)
            self._paged_out = False
            return
        for state, key, value in list(self._state_tensors()):
            device = state.get("_device")
            if device is not None and value.device != device:
                state[key] = value.to(device, non_blocking=True)
        self._state_version += 1
        self._paged_out = False

    def _has_gpu_state(self) -> bool:
        return any(p.is_cuda for group in self.param_groups for p in group["params"])

    def load_state_dict(self, state_dict) -> None:
        """torch's ``load_state_dict``, keeping this optimizer's own state dtypes: every entry is checked
        first (``ValueError`` naming the parameter; nothing loaded), and after torch's load, which casts
        state tensors to their parameter's dtype (lossy for bf16 parameters: fp32 moments, 8-bit codes
        and their fp32 scales), the checked tensors are copied back into fresh storage of their own
        dtype (managed memory when paged on a GPU), so resumes are bit-exact and repeatable."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict):
            raise ValueError("state_dict must come from Optimizer.state_dict() (param_groups and state)")
        params = [p for group in self.param_groups for p in group["params"]]
        if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
            raise ValueError("state_dict param_groups must be dicts with a 'params' list")
        ids = [i for group in groups for i in group["params"]]
        if len(ids) != len(params):
            raise ValueError(f"loaded state_dict has {len(ids)} parameters, this optimizer has {len(params)}")
        by_id = dict(zip(ids, params, strict=True))
        sources = {}
        for key, state in state_dict["state"].items():
            p = by_id.get(key)
            if p is None:
                raise ValueError(f"state for parameter {key} has no parameter here")
            if not isinstance(state, dict):
                raise ValueError(f"state of parameter {key} must be a dict, got {type(state).__name__}")
            self._check_state(p, state, f"state of parameter {key}")
            sources[key] = {name: state[name] for name in self._state_spec(p)}
            sources[key]["step"] = float(state["step"])
        super().load_state_dict(state_dict)
        for key, named in sources.items():
            p = by_id[key]
            local = _local(p)
            state = self.state[p]
            state.pop("_device", None)
            for name, value in named.items():
                if name == "step":
                    state[name] = torch.tensor(value, dtype=torch.float32)  # torch's convention: CPU fp32
                else:
                    state[name] = self._zeros(value.shape, value.dtype, local).copy_(value)
        self._paged_out = False
        self._state_version += 1


def _warn_cpu_paging() -> None:
    global _CPU_PAGING_WARNED
    if not _CPU_PAGING_WARNED:
        warnings.warn("paging is a no-op for CPU parameters: their state already lives in host memory", stacklevel=3)
        _CPU_PAGING_WARNED = True


class AdamW8bit(PagedAdamW):
    """AdamW with blockwise 8-bit state, not paged."""

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, maximize=False, min_8bit_size=4096
    ):
        super().__init__(params, lr, betas, eps, weight_decay, maximize, 8, False, min_8bit_size)


class PagedAdamW8bit(PagedAdamW):
    """AdamW with blockwise 8-bit state, paged."""

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, maximize=False, min_8bit_size=4096
    ):
        super().__init__(params, lr, betas, eps, weight_decay, maximize, 8, True, min_8bit_size)
