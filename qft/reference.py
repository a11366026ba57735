"""Pure-torch arithmetic of the ops that are not a format's encode or decode (those live with each
format in ``qft.formats``): the quantized linear layer and OFT's rotation, the CPU path and the oracle.

Each function fixes the order of fp32 roundings that the Triton and CUDA paths must reproduce.

OFT as PEFT >= 0.18 defines it: parameters ``[r, b(b-1)/2]`` hold each block's strict upper triangle
in ``triu_indices(b, b, 1)`` order; Q = U - U^T; R by Cayley-Neumann with n terms (n = 1: I; n = 2:
I + 2Q; n >= 3: I + 2 * sum_{k=1..m} Q^k + Q^(m+1), m = max(2, n - 2)) or exactly, (I - Q)(I + Q)^-1.
The input is rotated per block in fp32 (``x_rot[c] = sum_k x[k] R[k, c]``) and rounded back to x's dtype.
"""

from __future__ import annotations

import functools

import torch


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    # fp32 for every storage dtype; float64 stays float64 so gradcheck can run on this path.
    return torch.float64 if dtype == torch.float64 else torch.float32


def quant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    lora_xa: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scaling: float = 0.0,
) -> torch.Tensor:
    """``x @ weight^T + bias + scaling * lora_xa @ lora_B^T`` accumulated in fp32, rounded once to x's dtype.

    ``x`` [M, K]; ``weight`` [N, K], the dequantized base weight in x's dtype (as bitsandbytes
    decodes it); ``lora_xa`` [M, r] and ``lora_B`` [N, r] in any float dtype (fp32 adapters keep
    their precision).
    """
    acc_dtype = _accumulator(x.dtype)
    return linear_epilogue(x.to(acc_dtype) @ weight.to(acc_dtype).t(), bias, lora_xa, lora_B, scaling, x.dtype)


def linear_epilogue(acc, bias, lora_xa, lora_B, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """``acc + bias + scaling * lora_xa @ lora_B^T`` in acc's dtype (added in place), rounded once to
    ``dtype``: what follows the base product in ``quant_linear``, whichever GEMM made it."""
    if bias is not None:
        acc += bias.to(acc.dtype)
    if lora_xa is not None:
        acc.addmm_(lora_xa.to(acc.dtype), lora_B.to(acc.dtype).t(), alpha=scaling)
    return acc.to(dtype)


def blockdiag_linear(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(D_1, ..., D_n)^T`` = ``[x_1 D_1^T | ... | x_n D_n^T]`` [M, n * rows] for x [M, n * cols]
    and D [n, rows, cols] (DiaBlo's update), in D's dtype (x cast to it); x_i is x's i-th feature slice."""
    m = x.shape[0]
    n, rows, cols = blocks.shape
    return torch.einsum("mbi,boi->mbo", x.to(blocks.dtype).view(m, n, cols), blocks).reshape(m, n * rows)


def quant_linear_grad_input(
    grad: torch.Tensor,
    weight: torch.Tensor,
    lora_grad_xa: torch.Tensor | None = None,
    lora_A: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
    dropout_scale: float = 1.0,
) -> torch.Tensor:
    """``grad @ weight + (lora_grad_xa @ lora_A) * mask * dropout_scale`` in fp32, rounded to grad's dtype.

    ``grad`` [M, N]; ``weight`` [N, K] in grad's dtype; ``lora_grad_xa`` [M, r] (the gradient that
    reaches ``dropout(x) @ A^T``, scaling included); ``lora_A`` [r, K]; ``dropout_mask`` [M, K] bool.
    """
    acc_dtype = _accumulator(grad.dtype)
    acc = grad.to(acc_dtype) @ weight.to(acc_dtype)
    return grad_input_epilogue(acc, lora_grad_xa, lora_A, dropout_mask, dropout_scale, grad.dtype)


def grad_input_epilogue(acc, lora_grad_xa, lora_A, dropout_mask, dropout_scale: float, dtype) -> torch.Tensor:
    """``acc + (lora_grad_xa @ lora_A) * mask * dropout_scale`` in acc's dtype, rounded to ``dtype``: what
    follows ``grad @ W`` in ``quant_linear_grad_input``, whichever GEMM made it."""
    if lora_grad_xa is not None:
        lora = lora_grad_xa.to(acc.dtype) @ lora_A.to(acc.dtype)
        if dropout_mask is not None:
            lora *= dropout_mask * dropout_scale
        acc += lora
    return acc.to(dtype)


def lora_backward(grad, x_lora, xa, lora_A, lora_B, scaling: float, need_x: bool, grad_input):
    """LoRA's backward in the adapters' dtype (fp32 adapters over a bf16 layer: fp32, as PEFT):
    ``(grad_x, grad_a, grad_b)`` with grad_xa = s g B (the gradient reaching ``xa = x_lora @ A^T``),
    grad_a = grad_xa^T x_lora (empty without ``x_lora``), grad_b = s g^T xa and grad_x =
    ``grad_input(grad_xa)`` (empty when not ``need_x``)."""
    adapter = lora_A.dtype
    grad_ad = grad.to(adapter)
    grad_xa = scaling * (grad_ad @ lora_B)
    grad_x = grad_input(grad_xa) if need_x else grad.new_empty(0)
    grad_a = grad_xa.t() @ x_lora.to(adapter) if x_lora is not None else lora_A.new_empty(0)
    return grad_x, grad_a, scaling * (grad_ad.t() @ xa)


def _positions(block_size: int, device) -> torch.Tensor:
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=device)
    return rows * block_size + cols


@functools.cache
def _cpu_positions(block_size: int) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor, usable by autograd whatever mode built it
        return _positions(block_size, "cpu")


def _upper_positions(block_size: int, params: torch.Tensor) -> torch.Tensor:
    """Flat positions (row * b + col) of the strict upper triangle in ``triu_indices`` order: cached for
    plain CPU tensors (one rotation per forward would otherwise build them every call), built afresh
    where a mode or a tracer could be watching."""
    stack = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)
    plain = type(params) in (torch.Tensor, torch.nn.Parameter) and params.device.type == "cpu"
    if plain and not torch.compiler.is_compiling() and stack() == 0:
        return _cpu_positions(block_size)
    return _positions(block_size, params.device)


def oft_skew(params: torch.Tensor, block_size: int) -> torch.Tensor:
    """Q = U - U^T: ``[r, b(b-1)/2] -> [r, b, b]``."""
    flat = params.new_zeros(params.shape[0], block_size * block_size)
    upper = flat.index_copy(1, _upper_positions(block_size, params), params).view(-1, block_size, block_size)
    return upper - upper.transpose(-2, -1)


def oft_neumann_coefficients(neumann_terms: int) -> list[float]:
    """c_1..c_K of R = I + sum_k c_k Q^k (Cayley-Neumann with n terms, as ``rotation`` sums them)."""
    if neumann_terms <= 1:
        return []
    if neumann_terms == 2:
        return [2.0]
    m = max(2, neumann_terms - 2)
    return [2.0] * m + [1.0]


def oft_rotation_params_grad(params: torch.Tensor, grad_rot: torch.Tensor, block_size: int, neumann_terms: int):
    """dL/d(params) ``[r, b(b-1)/2]`` of the Cayley-Neumann R from dL/dR ``[r, b, b]``, closed form:
    with P = Q^T, dL/dQ = sum_k c_k T_k, T_1 = G, T_{k+1} = P T_k + G P^k; dL/dU = dQ - dQ^T."""
    g = grad_rot.to(params.dtype)
    p = oft_skew(params, block_size).transpose(-2, -1)
    grad_q = torch.zeros_like(g)
    term, power = g, p
    for k, c in enumerate(oft_neumann_coefficients(neumann_terms), start=1):
        if k > 1:
            term = p @ term + g @ power
            power = power @ p
        grad_q = grad_q + c * term
    skew = grad_q - grad_q.transpose(-2, -1)
    return skew.reshape(skew.shape[0], -1).index_select(1, _upper_positions(block_size, params))


def oft_rotation(
    params: torch.Tensor, block_size: int, neumann_terms: int = 5, use_neumann: bool = True
) -> torch.Tensor:
    """R for every block ``[r, b, b]`` (differentiable), in the parameters' dtype."""
    q = oft_skew(params, block_size)
    eye = torch.eye(block_size, device=params.device, dtype=params.dtype).expand_as(q)
    if not use_neumann:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = eye.clone()
    if neumann_terms > 1:
        r = r + 2 * q
        if neumann_terms > 2:
            power = q @ q
            r = r + 2 * power
            for _ in range(3, neumann_terms - 1):
                power = power @ q
                r = r + 2 * power
            r = r + power @ q
    return r


def oft_rotate(x: torch.Tensor, rot: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Rotate the last dimension of ``x`` block by block with ``rot`` [nb, b, b] (or its transposes)
    in fp32, rounded back to x's dtype; float64 stays float64 (gradcheck)."""
    nb, b, _ = rot.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    blocks = x.reshape(*x.shape[:-1], nb, b).to(acc)
    r = rot.to(acc).transpose(-2, -1) if transpose else rot.to(acc)
    return torch.einsum("...rk,rkc->...rc", blocks, r).reshape(x.shape).to(x.dtype)


def oft_rotation_grad(x: torch.Tensor, grad_rotated: torch.Tensor, nb: int, b: int) -> torch.Tensor:
    """dL/dR [nb, b, b] from x [M, K] and dL/d(x_rot) [M, K], accumulated in fp32 (or float64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xb = x.reshape(-1, nb, b).to(acc)
    gb = grad_rotated.reshape(-1, nb, b).to(acc)
    return torch.einsum("mrk,mrc->rkc", xb, gb)
