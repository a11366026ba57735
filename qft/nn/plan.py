"""LQ-LoRA's budgeted mixed formats (Guo et al. 2024, "LQ-LoRA: Low-rank Plus Quantized Matrix
Decomposition for Efficient Language Model Finetuning"): each linear layer gets the format, of a list of
candidates, that minimises the model's summed quantization error under a total memory budget in bits per
parameter, solved exactly as a multiple-choice knapsack (LQ-LoRA poses it as an integer linear program).

``plan_bits(model, budget=2.5)`` quantizes every chosen layer with every candidate once, measuring the
stored bytes (metadata included) and the error: ``||X (W - Q)^T||^2 / n`` on calibration inputs when
``calibration`` is given (``qft.nn.calibrate``), else ``||W - Q||_F^2``. The plan (a ``BitsPlan``)
saves to and loads from JSON, and ``quantize_(model, plan)`` applies it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from qft.adapters.lora.apiq import output_error
from qft.nn.config import QuantConfig
from qft.tensor import quantize

# Candidates for a budget between 2 and 4 bits: the searched 2-/3-bit code books, the affine ones, nf4.
DEFAULT_CANDIDATES = tuple(QuantConfig(f) for f in ("lloyd2", "int2", "lloyd3", "int3", "nf4"))
MAX_STATES = 1 << 24  # knapsack states before the byte unit is coarsened (sizes rounded up: never over budget)
PLAN_VERSION = 1


@dataclass
class BitsPlan:
    """A format per layer under a budget: ``configs`` (module name -> QuantConfig), the ``budget`` asked
    for and the plan's own ``bits_per_param`` (<= budget) over ``params`` parameters, and its summed
    ``error`` (``plan_bits``' measure)."""

    budget: float
    configs: dict[str, QuantConfig] = field(default_factory=dict)
    bits_per_param: float = 0.0
    params: int = 0
    error: float = 0.0

    def to_dict(self) -> dict:
        """The plan as JSON-ready values."""
        return {
            "version": PLAN_VERSION,
            "budget": self.budget,
            "bits_per_param": self.bits_per_param,
            "params": self.params,
            "error": self.error,
            "configs": {name: asdict(config) for name, config in self.configs.items()},
        }

    @classmethod
    def from_dict(cls, raw: Mapping) -> BitsPlan:
        """The inverse of ``to_dict``; ``ValueError`` naming what is wrong."""
        try:
            if raw["version"] != PLAN_VERSION:
                raise ValueError(f"version {raw['version']!r} (qft reads {PLAN_VERSION})")
            configs = {str(name): QuantConfig(**fields) for name, fields in raw["configs"].items()}
            return cls(
                float(raw["budget"]), configs, float(raw["bits_per_param"]), int(raw["params"]), float(raw["error"])
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(f"not a qft bits plan: {what}") from exc

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON to ``path`` (a file; written beside it and renamed, never half-written)."""
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BitsPlan:
        """A plan written by ``save``; ``ValueError`` naming the file when it is not one."""
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except (ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: {exc}") from exc


def _candidate_costs(w, candidates, hessian) -> list[tuple[int, float]]:
    """(stored bytes, error) of ``w`` under each candidate."""
    costs = []
    for c in candidates:
        gptq_hessian = hessian if c.method == "gptq" else None
        qt = quantize(w, c.format, c.block_size, c.double_quant, c.method, gptq_hessian, c.act_order)
        e = (w.float() - qt.dequantize(torch.float32)).double()
        error = output_error(e, hessian) if hessian is not None else float((e * e).sum())
        costs.append((int(qt.nbytes), error))
    return costs


def _knapsack(costs: list[list[tuple[int, float]]], capacity: int) -> list[int]:
    """The choice per item minimising the summed error with summed bytes <= ``capacity`` (exact, by dynamic
    programming over bytes in units of their gcd; coarsened, sizes rounded up, past ``MAX_STATES``)."""
    base = [min(b for b, _ in item) for item in costs]
    room = capacity - sum(base)
    if room < 0:
        raise ValueError("the budget is below the smallest candidate of every layer")
    extras = [[b - lo for b, _ in item] for item, lo in zip(costs, base, strict=True)]
    unit = math.gcd(*[x for item in extras for x in item]) or 1
    unit = max(unit, math.ceil(room / MAX_STATES))
    steps = room // unit
    best = np.zeros(steps + 1)  # least error using at most s units
    choices = []
    first = True
    for item, extra in zip(costs, extras, strict=True):
        new = np.full(steps + 1, np.inf)
        pick = np.zeros(steps + 1, dtype=np.int16)
        for i, ((_, error), x) in enumerate(zip(item, extra, strict=True)):
            size = -(-x // unit)  # rounded up: the plan never exceeds the budget
            if size > steps:
                continue
            shifted = np.full(steps + 1, np.inf)
            shifted[size:] = (0.0 if first else best[: steps + 1 - size]) + error
            better = shifted < new
            new[better], pick[better] = shifted[better], i
        best, first = new, False
        choices.append(pick)
    s = int(np.argmin(best))
    chosen = []
    for extra, pick in zip(reversed(extras), reversed(choices), strict=True):
        i = int(pick[s])
        chosen.append(i)
        s -= -(-extra[i] // unit)
    return chosen[::-1]


@torch.no_grad()
def plan_bits(
    model: nn.Module,
    budget: float,
    candidates: Sequence[QuantConfig | str] = DEFAULT_CANDIDATES,
    calibration: Mapping[str, torch.Tensor] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> BitsPlan:
    """The least-error format per ``nn.Linear`` of ``model`` (those ``quantize_`` would take) whose stored
    bits, metadata included, total at most ``budget`` bits per parameter (see the module text).

    ``candidates``: QuantConfigs or format names (block 64, double-quantized); gptq candidates need
    ``calibration``. ``ValueError`` for a budget below every layer's smallest candidate. The model is
    not changed; ``quantize_(model, plan)`` applies the plan.
    """
    from qft.nn.model import quantizable_linears

    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive number of bits per parameter, got {budget!r}")
    candidates = [QuantConfig(c) if isinstance(c, str) else c for c in candidates]
    if not candidates or not all(isinstance(c, QuantConfig) for c in candidates):
        raise TypeError("candidates must be QuantConfigs or format names, at least one")
    layers = quantizable_linears(model, filter_fn)
    if not layers:
        raise ValueError("the model has no nn.Linear layers to plan")
    needs = any(c.method == "gptq" for c in candidates)
    missing = [n for n in layers if needs and (calibration is None or n not in calibration)]
    if missing:
        raise ValueError(f"gptq candidates need calibration statistics for {missing[:3]} (qft.nn.calibrate)")
    costs = []
    for name, module in layers.items():
        hessian = None if calibration is None else calibration.get(name)
        costs.append(_candidate_costs(module.weight.detach(), candidates, hessian))
    params = sum(m.weight.numel() for m in layers.values())
    chosen = _knapsack(costs, math.floor(budget * params / 8))
    total = sum(item[i][0] for item, i in zip(costs, chosen, strict=True))
    return BitsPlan(
        budget=float(budget),
        configs={name: candidates[i] for name, i in zip(layers, chosen, strict=True)},
        bits_per_param=8 * total / params,
        params=params,
        error=sum(item[i][1] for item, i in zip(costs, chosen, strict=True)),
    )
