"""Tolerances derived from the computation, not picked by hand.

Two fp32 computations of the same sums in different orders (the Triton interpreter's matmuls against
torch's, a GPU against a CPU) differ by rounding that grows with the values' magnitude and the
reduction length, and varies with threads and load: a fixed ``atol`` either hides wrong answers or
flips. Here each result is compared with the exact (fp64) answer, and its error is bounded by a
multiple of what the fp32 reference itself makes on the same problem.
"""

from __future__ import annotations

import torch


def assert_as_accurate_as_reference(got, reference, exact, names=None, factor: float = 4.0) -> None:
    """For each tensor: ``|got - exact| <= factor * max(|reference - exact|, eps32 * max|exact|)``.

    ``got`` and ``reference`` are fp32 results of one computation, ``exact`` its fp64 result. A wrong
    answer (an error far above rounding: TF32, a lost term, a wrong index) fails; a different
    summation order does not.
    """
    names = names or [f"output {i}" for i in range(len(exact))]
    eps = torch.finfo(torch.float32).eps
    for name, a, ref, truth in zip(names, got, reference, exact, strict=True):
        truth = truth.double()
        own = (ref.double() - truth).abs().max().item()
        bound = factor * max(own, eps * truth.abs().max().item())
        error = (a.double() - truth).abs().max().item()
        assert error <= bound, f"{name}: error {error:.3g} vs fp64, the fp32 reference's is {own:.3g}"
