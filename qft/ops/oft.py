"""Custom ops of OFT: ``qft::oft_rotate`` (the input rotation by block-diagonal R or R^T),
``qft::oft_rotate_backward`` (grad_x and dL/dR from one read of x and the gradient) and
``qft::oft_rotation`` (R from the skew parameters by Cayley-Neumann, differentiable through
``qft::oft_rotation_backward``). Triton kernels: ``qft.kernels.oft_apply_rotation`` applies R,
``qft.kernels.oft_build_rotation`` builds it; on CPU and as the oracle, ``qft.reference``."""

from __future__ import annotations

import torch

from qft import reference
from qft.ops import cpu_calls, eager
from qft.ops.dispatch import on_gpu_backend

# The Triton rotation kernels hold a block's b x b matrices in registers / shared memory (tl.arange:
# b a power of two) up to 64 (compiled for sm_90 in tests/kernels/test_triton_compile.py); other blocks take
# the torch path.
TRITON_MAX_BLOCK = 64


def triton_rotates(t: torch.Tensor, b: int) -> bool:
    """True when blocks of size ``b`` over tensor ``t`` go to the Triton rotation kernels (a GPU backend
    runs t's device, t is not float64, b is a power of two up to TRITON_MAX_BLOCK)."""
    fits = 2 <= b <= TRITON_MAX_BLOCK and b & (b - 1) == 0
    return fits and on_gpu_backend(t.device) and t.dtype != torch.float64


def _check_rotate(x: torch.Tensor, rot: torch.Tensor) -> None:
    if x.dim() != 2 or rot.dim() != 3 or rot.shape[1] != rot.shape[2] or rot.shape[0] * rot.shape[1] != x.shape[1]:
        raise ValueError(f"rot {tuple(rot.shape)} does not tile x's last dimension {tuple(x.shape)}")


# Where the CPU kernels rotate: b a multiple of 16 up to 64 (vector registers), and shapes where torch's
# einsum runs the batched GEMM whose summation order the kernel repeats (fewer rows or blocks take other
# GEMM paths, with other roundings; tested bit for bit in tests/ops/test_backend_cpu.py).
CPU_ROTATE_BLOCKS = (16, 32, 48, 64)
CPU_ROTATE_MIN_ROWS, CPU_ROTATE_MIN_BLOCKS = 16, 4


def cpu_rotates(x: torch.Tensor, rot: torch.Tensor) -> bool:
    """Whether ``oft_rotate(x, rot)`` runs ``qft._cpu``'s kernel: the reference's bits (see
    ``CPU_ROTATE_MIN_ROWS``), one call instead of a dtype copy, two layout copies, a GEMM and a copy back."""
    nb, b, _ = rot.shape
    fits = b in CPU_ROTATE_BLOCKS and x.shape[0] >= CPU_ROTATE_MIN_ROWS and nb >= CPU_ROTATE_MIN_BLOCKS
    return fits and rot.dtype == torch.float32 and x.dtype != torch.float64 and cpu_calls.avx512_kernels_for(x)


def _rotate(x: torch.Tensor, rot: torch.Tensor, transpose: bool) -> torch.Tensor:
    if cpu_rotates(x, rot):
        return cpu_calls.oft_rotate(x.contiguous(), rot, transpose)
    if not triton_rotates(x, rot.shape[1]):
        return reference.oft_rotate(x, rot, transpose)
    from qft.kernels.oft_apply_rotation import rotate

    return rotate(x, rot, transpose)


@eager.custom_op("qft::oft_rotate", mutates_args=())
def oft_rotate(x: torch.Tensor, rot: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``x`` [M, K] rotated per block by ``rot`` [K / b, b, b] (by R^T when ``transpose``), computed in
    fp32 and returned in x's dtype."""
    _check_rotate(x, rot)
    return _rotate(x, rot, transpose)


@oft_rotate.register_fake
def _(x, rot, transpose):
    return torch.empty_like(x)


@eager.custom_op("qft::oft_rotate_backward", mutates_args=())
def oft_rotate_backward(x: torch.Tensor, grad: torch.Tensor, rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of ``oft_rotate(x, rot, False)``: (grad_x = grad R^T per block in grad's dtype,
    dL/dR = x^T grad per block [K / b, b, b] accumulated in fp32, in rot's dtype)."""
    _check_rotate(x, rot)
    if grad.shape != x.shape:
        raise ValueError(f"grad {tuple(grad.shape)} must have x's shape {tuple(x.shape)}")
    nb, b, _ = rot.shape
    if b in CPU_ROTATE_BLOCKS and x.shape[0] > 0 and x.dtype != torch.float64 and cpu_calls.avx512_kernels_for(x):
        grad_x = _rotate(grad, rot, True)
        # dL/dR sums over the rows in order (not torch's bits: an fp32 parameter gradient needs none)
        return grad_x, cpu_calls.oft_rotation_grad(x.contiguous(), grad.contiguous(), nb, b).to(rot.dtype)
    if not triton_rotates(x, rot.shape[1]):
        grad_x = reference.oft_rotate(grad, rot, True)
        return grad_x, reference.oft_rotation_grad(x, grad, nb, b).to(rot.dtype)
    from qft.kernels.oft_apply_rotation import rotate_backward

    grad_x, grad_rot = rotate_backward(x, grad, rot)
    return grad_x, grad_rot.to(rot.dtype)


@oft_rotate_backward.register_fake
def _(x, grad, rot):
    return torch.empty_like(grad), torch.empty_like(rot)


def _cpu_kernel_grad(params: torch.Tensor, grad_rot: torch.Tensor) -> bool:
    """Whether the rotation's backward runs ``qft._cpu``'s kernel: fp32, b whose rows fit AVX-512 registers,
    on the CPU backend (one call per step, where the reference's dozen small batched matmuls cost more in
    overhead than in arithmetic; the kernel's scalar loop elsewhere would not)."""
    fp32 = params.dtype == torch.float32 and grad_rot.dtype == torch.float32
    return fp32 and grad_rot.shape[-1] in CPU_ROTATE_BLOCKS and cpu_calls.avx512_kernels_for(params)


def _check_params(params: torch.Tensor, block_size: int, terms: int) -> None:
    row = block_size * (block_size - 1) // 2
    if params.dim() != 2 or params.shape[1] != row:
        raise ValueError(f"params must be [blocks, {row}] for block_size {block_size}, got {tuple(params.shape)}")
    if terms < 1:
        raise ValueError(f"cayley_neumann_terms must be positive, got {terms}")


def _rotate_setup(ctx, inputs, output):
    x, rot, transpose = inputs
    ctx.save_for_backward(x, rot)
    ctx.transpose = transpose


def _rotate_autograd(ctx, grad):
    x, rot = ctx.saved_tensors
    if not ctx.transpose:
        grad_x, grad_rot = oft_rotate_backward(x, grad, rot)
        return grad_x, grad_rot, None
    grad_x, grad_rot_t = oft_rotate_backward(x, grad, rot.transpose(-2, -1).contiguous())
    return grad_x, grad_rot_t.transpose(-2, -1), None


oft_rotate.register_autograd(_rotate_autograd, setup_context=_rotate_setup)


@eager.custom_op("qft::oft_rotation", mutates_args=())
def oft_rotation(params: torch.Tensor, block_size: int, terms: int) -> torch.Tensor:
    """R ``[blocks, b, b]`` in params' dtype from skew parameters ``[blocks, b(b-1)/2]`` by
    Cayley-Neumann with ``terms`` terms (``qft.reference.oft_rotation``); all blocks in one launch
    on a GPU (power-of-two b)."""
    _check_params(params, block_size, terms)
    if not triton_rotates(params, block_size):
        return reference.oft_rotation(params, block_size, terms)
    from qft.kernels.oft_build_rotation import rotation

    return rotation(params, block_size, terms).to(params.dtype)


@oft_rotation.register_fake
def _(params, block_size, terms):
    return params.new_empty((params.shape[0], block_size, block_size))


@eager.custom_op("qft::oft_rotation_backward", mutates_args=())
def oft_rotation_backward(params: torch.Tensor, grad_rot: torch.Tensor, block_size: int, terms: int) -> torch.Tensor:
    """dL/d(params) of ``oft_rotation`` from dL/dR, in params' dtype (closed form, see
    ``qft.reference.oft_rotation_params_grad``)."""
    _check_params(params, block_size, terms)
    if grad_rot.shape != (params.shape[0], block_size, block_size):
        raise ValueError(
            f"grad_rot must be [{params.shape[0]}, {block_size}, {block_size}], got {tuple(grad_rot.shape)}"
        )
    if _cpu_kernel_grad(params, grad_rot):
        coefficients = reference.oft_neumann_coefficients(terms)
        if not coefficients:  # R = I: no parameter reaches it
            return torch.zeros_like(params)
        return cpu_calls.oft_rotation_params_grad(params.contiguous(), grad_rot.contiguous(), block_size, coefficients)
    if not triton_rotates(params, block_size):
        return reference.oft_rotation_params_grad(params, grad_rot, block_size, terms)
    from qft.kernels.oft_build_rotation import rotation_grad

    return rotation_grad(params, grad_rot, block_size, terms).to(params.dtype)


@oft_rotation_backward.register_fake
def _(params, grad_rot, block_size, terms):
    return torch.empty_like(params)


def _rotation_setup(ctx, inputs, output):
    params, block_size, terms = inputs
    ctx.save_for_backward(params)
    ctx.block_size, ctx.terms = block_size, terms


def _rotation_backward(ctx, grad_rot):
    (params,) = ctx.saved_tensors
    return oft_rotation_backward(params, grad_rot, ctx.block_size, ctx.terms), None, None


oft_rotation.register_autograd(_rotation_backward, setup_context=_rotation_setup)


class _EagerRotation(torch.autograd.Function):
    """``qft::oft_rotation`` with its registered backward, as one autograd.Function over the ops' bodies:
    what the op computes, without torch.library's autograd layers (on CPU they cost more than the math)."""

    @staticmethod
    def forward(ctx, params, block_size, terms):
        ctx.save_for_backward(params)
        ctx.block_size, ctx.terms = block_size, terms
        return eager.body(oft_rotation)(params, block_size, terms)

    @staticmethod
    def backward(ctx, grad_rot):
        (params,) = ctx.saved_tensors
        return eager.body(oft_rotation_backward)(params, grad_rot.contiguous(), ctx.block_size, ctx.terms), None, None


def rotation(params: torch.Tensor, block_size: int, terms: int) -> torch.Tensor:
    """``oft_rotation(params, block_size, terms)``, differentiable; by ``_EagerRotation`` where nothing
    traces the call (``eager.untraced_cpu``)."""
    if eager.untraced_cpu(params):
        return _EagerRotation.apply(params, block_size, terms)
    return oft_rotation(params, block_size, terms)
