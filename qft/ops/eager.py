"""Running a ``qft::`` op's Python body directly, skipping torch.library's dispatcher, where that is the
same computation: on CPU at small shapes the dispatcher's Python layers cost as much as the work.

``custom_op`` declares an op as ``torch.library.custom_op`` does and remembers its body; ``call`` runs
the body when nothing could see the difference (plain CPU tensors, autograd off, no compile, trace or
dispatch mode), else the op.
"""

from __future__ import annotations

import torch

_bodies: dict[object, object] = {}


def custom_op(name: str, **kwargs):
    """``torch.library.custom_op(name, **kwargs)``, the undecorated function kept for ``call``."""

    def declare(fn):
        op = torch.library.custom_op(name, **kwargs)(fn)
        _bodies[op] = fn
        return op

    return declare


def _dispatch_modes() -> int:
    # The torch-dispatch mode stack, infra modes (fake, proxy, functional) included; a torch without
    # the call counts as one mode, so its calls keep the dispatcher.
    count = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return count() if count is not None else 1


def _functorch_wrapped(t: torch.Tensor) -> bool:
    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return True if wrapped is None else wrapped(t)  # unknown: assume vmap/grad could be wrapping it


def untraced_cpu(first: torch.Tensor) -> bool:
    """Whether ``first`` is a plain CPU tensor (or parameter) and nothing compiles, traces, transforms
    (vmap, grad) or intercepts the call."""
    return (
        type(first) in (torch.Tensor, torch.nn.Parameter)
        and first.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and _dispatch_modes() == 0
        and not _functorch_wrapped(first)
    )


def call(op, first: torch.Tensor, *args):
    """``op(first, *args)``; by its body when ``untraced_cpu(first)`` and autograd is off (the caller is
    an autograd.Function's forward or backward)."""
    body = _bodies.get(op)  # None for a callable that is not such an op: it is simply called
    direct = body is not None and not torch.is_grad_enabled() and untraced_cpu(first)
    return body(first, *args) if direct else op(first, *args)


def body(op):
    """The undecorated function of an op declared with ``custom_op``."""
    return _bodies[op]
