"""Record Triton launches without running them and compile them for a GPU target on a machine
without one: shared by ``.ci/triton_compile_check.py`` and ``kernel_report.py``.

``record(module, calls)`` replaces each ``*kernel`` JIT function of a ``qft.kernels`` module by a
recorder, so a launcher called on CPU tensors appends ``(name, fn, args, kwargs)`` to ``calls``;
``compile_launch`` turns one into a compiled kernel for ``sm_<arch>`` (ptxas included). Import this
module only with ``TRITON_INTERPRET`` unset: the interpreter would run the kernels instead.
"""

from __future__ import annotations

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.uint8: "u8",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
}
# Launch keywords that are compile options, not kernel arguments.
OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


class _Recorder:
    def __init__(self, name, fn, calls):
        self.name, self.fn, self.calls = name, fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, self.fn, args, kwargs))


def record(module, calls: list) -> None:
    """Replace every ``*kernel`` JIT function of ``module`` by a recorder appending to ``calls``."""
    for name, value in vars(module).items():
        if isinstance(value, triton.runtime.jit.JITFunction) and name.endswith("kernel"):
            setattr(module, name, _Recorder(f"{module.__name__.rpartition('.')[2]}.{name}", value, calls))


def _type(name, value):
    """Triton's signature string for one runtime argument (a tuple of them for a tuple argument)."""
    if isinstance(value, tuple):
        return tuple(_type(name, v) for v in value)
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"{name}: cannot type {type(value).__name__}")


def signature(fn, args, kwargs) -> tuple[dict, dict]:
    """``(signature, constexprs)`` of one recorded launch, as ``ASTSource`` takes them."""
    values = dict(zip(fn.arg_names, args, strict=False))  # keyword arguments follow
    values.update(kwargs)
    types, constexprs = {}, {}
    for param in fn.params:
        value = values[param.name]
        if param.is_constexpr or value is None:
            types[param.name] = "constexpr"
            constexprs[param.name] = value
        else:
            types[param.name] = _type(param.name, value)
    return types, constexprs


def compile_launch(fn, args, kwargs, arch: int = 90):
    """The recorded launch compiled for ``sm_<arch>`` with the launch's own options (warps, stages,
    fp fusion), as the GPU would build it."""
    types, constexprs = signature(fn, args, kwargs)
    options = {k: kwargs[k] for k in OPTIONS if k in kwargs}
    source = ASTSource(fn=fn, signature=types, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
