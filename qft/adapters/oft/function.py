"""OFT's autograd function over a quantized weight, R from its parameters, and COFT's projection.

The rotation math itself (Cayley-Neumann, per-block rotation and their gradients) is
``qft.reference``, below the ``qft::oft_*`` ops that run it on CPU and check their kernels.
``oft_linear`` keeps for backward x (its own dtype, only when the parameters need a gradient) and R
(``[in / b, b, b]``); never an fp32 copy of x or a decoded weight.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from qft import ops, reference
from qft.functional import _autocast_dtype, _cast, _check_bias, _check_x, _without_autocast
from qft.ops import eager
from qft.ops import oft as oft_ops
from qft.tensor import QuantizedTensor


class _OFTLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, rot, bias, qt):
        # qft::quant_linear rotates x once, then runs the plain layer's kernels.
        y = eager.call(ops.quant_linear, x2d, *qt.op_args(), bias, None, None, 0.0, rot)
        ctx.save_for_backward(x2d if ctx.needs_input_grad[1] else None, rot)
        ctx.qt = qt
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        x2d, rot = ctx.saved_tensors
        qt = ctx.qt
        needs_x, needs_rot, needs_bias = ctx.needs_input_grad[:3]
        grad_x = grad_rot = grad_bias = None
        if needs_x or needs_rot:
            grad_rotated = eager.call(ops.quant_linear_grad_input, grad, *qt.op_args(), None, None, None, 1.0)
            if needs_rot:  # one kernel: grad_x = g R^T and dL/dR = x^T g from one read of x and g
                grad_x, grad_rot = eager.call(ops.oft_rotate_backward, x2d, grad_rotated, rot)
                grad_x = grad_x if needs_x else None
            else:
                grad_x = eager.call(ops.oft_rotate, grad_rotated, rot, True)
        if needs_bias:
            grad_bias = grad.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_rot, grad_bias, None


def oft_rotation(
    oft_weight: torch.Tensor,
    block_size: int,
    blocks: int,
    cayley_neumann_terms: int = 5,
    use_cayley_neumann: bool = True,
) -> torch.Tensor:
    """R ``[blocks, b, b]`` (differentiable) from OFT's skew parameters ``[blocks or 1, b(b-1)/2]``.

    Cayley-Neumann runs through ``qft::oft_rotation`` (one launch for all blocks on a GPU, closed-form
    backward); the exact Cayley transform through ``torch.linalg.solve``. One shared row is expanded
    to every block (block_share). Where no graph is built (``_reusable``), R is kept per parameter tensor
    and reused while the parameters hold the same values."""
    key = (block_size, cayley_neumann_terms, use_cayley_neumann)
    reusable = _reusable(oft_weight)
    cached = _ROTATIONS.get(oft_weight) if reusable else None
    if cached is not None and cached[0] == key and _unchanged(cached[1], oft_weight):
        return cached[2].expand(blocks, block_size, block_size)
    if use_cayley_neumann and cayley_neumann_terms > 1:  # n = 1: R = I, unconnected to the parameters as in PEFT
        rot = oft_ops.rotation(oft_weight, block_size, cayley_neumann_terms)
    else:
        rot = reference.oft_rotation(oft_weight, block_size, cayley_neumann_terms, use_cayley_neumann)
    if reusable:
        _ROTATIONS[oft_weight] = (key, oft_weight.detach().clone(), rot)
    return rot.expand(blocks, block_size, block_size)


# R of the last no-grad call per parameter tensor: eval and generation run the same R every forward.
_ROTATIONS = WeakIdKeyDictionary()


def _reusable(params: torch.Tensor) -> bool:
    """Whether R may come from (and go to) ``_ROTATIONS``: no graph to build (autograd off, or params
    frozen), outside inference mode (its tensors could not be used by a later graph) and autocast (its R
    is built from rounded products), nothing tracing."""
    if not eager.untraced_cpu(params):  # first: under torch.compile the mode queries below do not trace
        return False
    no_graph = not torch.is_grad_enabled() or not params.requires_grad
    return no_graph and not torch.is_inference_mode_enabled() and not torch.is_autocast_enabled("cpu")


def _unchanged(seen: torch.Tensor, params: torch.Tensor) -> bool:
    """Whether ``params`` holds the values R was built from (``seen``, a copy). Compared by value, not by
    version counter: qft's own optimizer kernels write parameters through raw pointers, which no counter
    sees (a few thousand values: microseconds)."""
    return seen.dtype == params.dtype and seen.shape == params.shape and torch.equal(seen, params)


def rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """``x [..., in]`` rotated per block by ``rot [in / b, b, b]`` (differentiable in both), in x's dtype:
    the unfused path, for a base layer that is not one quantized matmul."""
    return ops.oft_rotate(x.reshape(-1, x.shape[-1]), rot, False).view(x.shape)


def oft_linear(
    x: torch.Tensor,
    qt: QuantizedTensor,
    oft_weight: torch.Tensor,
    block_size: int,
    bias: torch.Tensor | None = None,
    cayley_neumann_terms: int = 5,
    use_cayley_neumann: bool = True,
) -> torch.Tensor:
    """QOFT linear: ``rotate(x) @ W^T + bias``, x rotated per block by R (PEFT >= 0.18's OFT).

    Args:
        x: ``[..., in]`` fp32/fp16/bf16; the output follows its dtype.
        qt: frozen quantized weight ``[out, in]``.
        oft_weight: ``[in / block_size, b(b-1)/2]`` skew parameters (strict upper triangles), or
            ``[1, b(b-1)/2]`` shared by every block (block_share); fp32 by default.
        block_size: b; must divide in_features (qft refuses what PEFT would silently adjust).
        cayley_neumann_terms / use_cayley_neumann: R's parametrization (see ``qft.reference``).

    Returns ``[..., out]``. Saved for backward: x (its own dtype, only if the OFT parameters need a
    gradient) and R (``[in / b, b, b]``); never an fp32 copy of x or a decoded weight.
    """
    _check_x(x, qt)
    _check_bias(bias, qt)
    in_features = qt.shape[1]
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2, got {block_size!r}")
    if in_features % block_size:
        raise ValueError(f"block_size {block_size} does not divide in_features {in_features}")
    blocks = in_features // block_size
    row = block_size * (block_size - 1) // 2
    if not isinstance(oft_weight, torch.Tensor) or oft_weight.dim() != 2 or oft_weight.shape[1] != row:
        shape = tuple(getattr(oft_weight, "shape", ()))
        raise ValueError(f"oft_weight must be [{blocks} or 1, {row}] for block_size {block_size}, got {shape}")
    if oft_weight.shape[0] not in (1, blocks):
        raise ValueError(f"oft_weight must have {blocks} rows (or 1 when shared), got {oft_weight.shape[0]}")
    if isinstance(cayley_neumann_terms, bool) or not isinstance(cayley_neumann_terms, int) or cayley_neumann_terms < 1:
        raise ValueError(f"cayley_neumann_terms must be a positive int, got {cayley_neumann_terms!r}")
    with torch.autocast(x.device.type, enabled=False):  # R is built in fp32, also under autocast
        rot = oft_rotation(oft_weight, block_size, blocks, cayley_neumann_terms, use_cayley_neumann)
    return rotated_linear(x, qt, rot, bias)


def rotated_linear(x: torch.Tensor, qt: QuantizedTensor, rot: torch.Tensor, bias: torch.Tensor | None = None):
    """``rotate(x, R) @ W^T + bias`` over a quantized W [out, in] for any block rotation R [in / b, b, b]
    (differentiable in x, R and bias): OFT's path, which BOFT's butterflies also take. x is kept once in
    its own dtype (when R needs a gradient) and R; under autocast x and bias take the autocast dtype and
    R stays fp32."""
    _check_x(x, qt)
    _check_bias(bias, qt)
    dtype = _autocast_dtype(x)
    if dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            x, bias = _cast(dtype, x, bias)
            return rotated_linear(x, qt, rot, bias)
    lead = x.shape[:-1]
    y = _OFTLinear.apply(x.reshape(-1, qt.shape[1]), rot, bias, qt)
    return y.view(*lead, qt.shape[0])


@torch.no_grad()
def coft_project(params: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """COFT: each block's Q projected onto the Frobenius ball of radius eps / sqrt(r) (PEFT's
    ``_project_batch``), returned as parameters ``[r, b(b-1)/2]``."""
    q = reference.oft_skew(params, block_size)
    radius = eps * (1 / torch.sqrt(torch.tensor(params.shape[0])))  # fp32 steps, as PEFT computes them
    norm = torch.norm(q, dim=(1, 2), keepdim=True)
    projected = torch.where(norm <= radius, q, radius * (q / norm))
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=params.device)
    return projected[:, rows, cols]
