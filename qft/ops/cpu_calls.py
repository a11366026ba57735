"""The only place Python calls the kernels of ``qft._cpu``: one typed wrapper per entry point.

Like ``cuda_calls`` for ``qft._C``: the module takes raw addresses (no torch headers), so each
wrapper takes tensors and passes their addresses by keyword (pybind11 checks every name against
``csrc/cpu/bindings_cpu.cpp``), after checking what the kernel cannot: every tensor on the CPU,
contiguous, of the dtype it reads. A refused call raises ``ValueError``.
"""

from __future__ import annotations

import functools

import torch

from qft import formats
from qft._extension import cpu_extension
from qft.formats import Weight, moments8
from qft.ops.dispatch import DTYPE_CODES, backend_for


def module():
    """``qft._cpu``, or ``RuntimeError`` saying why it is unavailable."""
    ext = cpu_extension()
    if ext.module is None:
        raise RuntimeError(f"the qft CPU extension is not available: {ext.error}")
    return ext.module


def _host(t: torch.Tensor | None, name: str) -> int:
    if t is None:
        return 0
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CPU tensor for the CPU kernels, got {t.device} {t.stride()}")
    return t.data_ptr()


def _weight_args(weight: Weight) -> tuple:
    """The weight's part addresses, its format's tables and numbers: the kernels' ``weight`` argument,
    the fields of ``csrc/cpu/cpu_kernels.h``'s Weight in order."""
    fmt = formats.get_format(weight.fmt)
    device = weight.device
    code = None if fmt.affine else formats.code(weight.fmt, device)  # cached per device
    dynamic_map = formats.dynamic_map(device) if weight.double_quant else None
    zeros = weight.zeros.view(torch.int16) if weight.zeros is not None else None  # fp16 bits
    return (
        _host(weight.codes, "codes"),
        _host(weight.scales, "scales"),
        _host(zeros, "zeros"),
        _host(weight.nested_scales, "nested_scales"),
        _host(weight.offset, "offset"),
        _host(code, "code"),
        _host(dynamic_map, "dynamic_map"),
        fmt.bits,
        fmt.affine,
        weight.numel,
        weight.block_size,
        weight.nested_block_size,
    )


def dequantize(weight: Weight, out: torch.Tensor, round_dtype: torch.dtype) -> None:
    """Decode every value of ``weight`` into ``out`` (flat, fp32 or ``round_dtype``), each value rounded
    to ``round_dtype`` as ``qft.formats.dequantize(weight, round_dtype)`` rounds it."""
    if out.numel() != weight.numel or out.dtype not in (torch.float32, round_dtype):
        raise ValueError(f"out must hold {weight.numel} fp32 or {round_dtype} values, got {out.numel()} {out.dtype}")
    codes = {"out_dtype": DTYPE_CODES[out.dtype], "round_dtype": DTYPE_CODES[round_dtype]}
    module().dequantize(weight=_weight_args(weight), out=_host(out, "out"), **codes)


def max_gemv_rows() -> int:
    """The largest M ``quant_gemv`` serves."""
    return module().max_gemv_rows


def quant_gemv(x, weight: Weight, bias, lora_xa, lora_b, scaling: float, y) -> None:
    """``y = x @ W^T + bias + scaling * lora_xa @ lora_b^T`` for x [M <= ``max_gemv_rows()``, K] (K and the
    block size multiples of 32); lora_xa [M, r] and lora_b [N, r] fp32 (or both None); y [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.numel // k
    if y.shape != (m, n) or y.dtype != x.dtype:
        raise ValueError(f"y must be [{m}, {n}] {x.dtype}, got {tuple(y.shape)} {y.dtype}")
    if lora_xa is not None and (lora_xa.dtype != torch.float32 or lora_b.dtype != torch.float32):
        raise ValueError("lora_xa and lora_b must be fp32")
    module().quant_gemv(
        weight=_weight_args(weight),
        x=_host(x, "x"),
        x_dtype=DTYPE_CODES[x.dtype],
        rows=m,
        n_out=n,
        k_in=k,
        bias=_host(bias, "bias"),
        bias_dtype=DTYPE_CODES[bias.dtype] if bias is not None else 0,
        lora_xa=_host(lora_xa, "lora_xa"),
        lora_b=_host(lora_b, "lora_b"),
        rank=0 if lora_xa is None else lora_xa.shape[1],
        scaling=scaling,
        y=_host(y, "y"),
    )


def bf16_kernels() -> bool:
    """Whether the bf16 linear kernels run here (AVX512-BF16, not capped by ``set_isa_cap``)."""
    return module().isa() == "avx512bf16"


def avx512_kernels_for(t: torch.Tensor) -> bool:
    """Whether ops on ``t`` may call the kernels of the ``bf16_kernels`` level from outside the CPU backend
    (OFT's rotation, LoRA's thin products): a CPU tensor whose ops run on the CPU backend, at that level."""
    return t.device.type == "cpu" and backend_for(t.device) == "cpu" and bf16_kernels()


def lora_fits(rows: int, left, right, right_shape) -> bool:
    """Whether LoRA operands have the extents the kernels read: none, or left [rows, r > 0] with right of
    shape ``right_shape(r)``."""
    if left is None or right is None:
        return left is None and right is None
    r = left.shape[-1]
    return left.dim() == 2 and left.shape[0] == rows and r > 0 and tuple(right.shape) == right_shape(r)


def _lora_rank(rows: int, left, right, right_shape) -> int:
    """r of the LoRA operands (``lora_fits``, both fp32; 0 without them), else ValueError."""
    if left is None and right is None:
        return 0
    if left is None or right is None or left.dtype != torch.float32 or right.dtype != torch.float32:
        raise ValueError("the LoRA operands must both be fp32 tensors, or both None")
    if not lora_fits(rows, left, right, right_shape):
        raise ValueError(f"LoRA operands {tuple(left.shape)} and {tuple(right.shape)} do not fit {rows} rows")
    return left.shape[-1]


def _bf16_product(entry: str, a, weight: Weight, out_width: int, left, right, right_shape, **named) -> torch.Tensor:
    """``a`` [M, width] bf16 through the bf16 kernel ``entry`` into a new [M, out_width] bf16 tensor."""
    if a.dtype != torch.bfloat16 or a.dim() != 2:
        raise ValueError(f"the bf16 kernels take a 2-D bf16 tensor, got {a.dtype} {tuple(a.shape)}")
    rank = _lora_rank(a.shape[0], left, right, right_shape)
    out = a.new_empty((a.shape[0], out_width))
    getattr(module(), entry)(weight=_weight_args(weight), rows=a.shape[0], rank=rank, **named, out=_host(out, "out"))
    return out


def quant_linear_bf16(x, weight: Weight, bias, lora_xa, lora_b, scaling: float) -> torch.Tensor:
    """bf16 ``x @ W^T + bias + scaling * lora_xa @ lora_b^T`` by ``qft._cpu``'s bf16 dot products: x [M, K]
    bf16 (K and the block size multiples of 32), bias [N] (any float dtype), lora_xa [M, r] and lora_b
    [N, r] fp32 (or both None)."""
    k = x.shape[-1]
    n = weight.numel // k
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    return _bf16_product(
        "quant_linear_bf16", x, weight, n, lora_xa, lora_b, lambda r: (n, r),
        x=_host(x, "x"), n_out=n, k_in=k, bias=_host(bias, "bias"),
        bias_dtype=DTYPE_CODES[bias.dtype] if bias is not None else 0,
        lora_xa=_host(lora_xa, "lora_xa"), lora_b=_host(lora_b, "lora_b"), scaling=scaling,
    )  # fmt: skip


def quant_linear_grad_input_bf16(grad, weight: Weight, lora_grad_xa=None, lora_a=None) -> torch.Tensor:
    """bf16 ``grad @ W + lora_grad_xa @ lora_a`` by ``qft._cpu``'s bf16 dot products: grad [M, N] bf16,
    lora_grad_xa [M, r] and lora_a [r, K] fp32 (or both None)."""
    n = grad.shape[-1]
    k = weight.numel // n
    return _bf16_product(
        "quant_linear_grad_input_bf16", grad, weight, k, lora_grad_xa, lora_a, lambda r: (r, k),
        grad=_host(grad, "grad"), n_out=n, k_in=k,
        lora_grad_xa=_host(lora_grad_xa, "lora_grad_xa"), lora_a=_host(lora_a, "lora_a"),
    )  # fmt: skip


def _thin_operands(a, f, a_rows: int, f_rows: int, what: str) -> None:
    if a.dtype != torch.bfloat16 or f.dtype != torch.float32 or a.dim() != 2 or f.dim() != 2:
        raise ValueError(f"{what} takes a 2-D bf16 and a 2-D fp32 tensor, got {a.dtype} {f.dtype}")
    if a_rows != f_rows or 0 in a.shape or 0 in f.shape:
        raise ValueError(f"{what}: shapes {tuple(a.shape)} and {tuple(f.shape)} do not fit")


def bf16_times_fp32_nt(a, f) -> torch.Tensor:
    """fp32 ``a @ f^T`` [M, outs] of bf16 a [M, width] and fp32 f [outs, width] (LoRA's ``x A^T``), a
    widened exactly in registers: no fp32 copy of a."""
    _thin_operands(a, f, a.shape[-1], f.shape[-1], "bf16_times_fp32_nt")
    out = torch.empty(a.shape[0], f.shape[0], dtype=torch.float32)
    module().bf16_times_fp32_nt(
        a=_host(a, "a"), rows=a.shape[0], width=a.shape[1], f=_host(f, "f"), outs=f.shape[0], out=_host(out, "out")
    )
    return out


def fp32_tn_times_bf16(f, a) -> torch.Tensor:
    """fp32 ``f^T @ a`` [outs, width] of fp32 f [M, outs] and bf16 a [M, width] (LoRA's ``grad_xa^T x``,
    ``xa^T g``), a widened exactly in registers: no fp32 copy of a."""
    _thin_operands(a, f, a.shape[0], f.shape[0], "fp32_tn_times_bf16")
    out = torch.empty(f.shape[1], a.shape[1], dtype=torch.float32)
    module().fp32_tn_times_bf16(
        f=_host(f, "f"), rows=a.shape[0], outs=f.shape[1], a=_host(a, "a"), width=a.shape[1], out=_host(out, "out")
    )
    return out


def oft_rotation_params_grad(params, grad_rot, block_size: int, coefficients: list[float]) -> torch.Tensor:
    """dL/d(params) of OFT's Cayley-Neumann rotation (``qft.reference.oft_rotation_params_grad``'s closed form
    with ``coefficients`` c_1..c_K) from dL/dR: params [blocks, b(b-1)/2] and grad_rot [blocks, b, b], fp32."""
    if params.dtype != torch.float32 or grad_rot.dtype != torch.float32:
        raise ValueError(f"params and grad_rot must be fp32, got {params.dtype} and {grad_rot.dtype}")
    blocks = params.shape[0]
    if params.dim() != 2 or tuple(grad_rot.shape) != (blocks, block_size, block_size) or not coefficients:
        raise ValueError(f"grad_rot must be [{blocks}, {block_size}, {block_size}], got {tuple(grad_rot.shape)}")
    table = torch.tensor(coefficients, dtype=torch.float32)
    out = torch.empty_like(params)
    module().oft_rotation_params_grad(
        params=_host(params, "params"),
        grad_rot=_host(grad_rot, "grad_rot"),
        blocks=blocks,
        block_size=block_size,
        coefficients=_host(table, "coefficients"),
        count=len(coefficients),
        out=_host(out, "out"),
    )
    return out


def oft_rotate(x, rot, transpose: bool) -> torch.Tensor:
    """``x`` [M, K] rotated per block by ``rot`` [K / b, b, b] fp32 (R^T when ``transpose``), in x's dtype:
    fp32 fused multiply-adds in k order, one rounding (``csrc/cpu/oft_rotate_cpu.cpp``)."""
    blocks, b, _ = rot.shape
    if rot.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != blocks * b:
        raise ValueError(f"rot must be fp32 blocks tiling x's rows, got {tuple(rot.shape)} for {tuple(x.shape)}")
    rot = rot.contiguous()
    out = torch.empty_like(x)
    module().oft_rotate(
        x=_host(x, "x"),
        x_dtype=DTYPE_CODES[x.dtype],
        rot=_host(rot, "rot"),
        rows=x.shape[0],
        blocks=blocks,
        block_size=b,
        transpose=transpose,
        out=_host(out, "out"),
        out_dtype=DTYPE_CODES[out.dtype],
    )
    return out


def oft_rotation_grad(x, grad, blocks: int, b: int) -> torch.Tensor:
    """dL/dR [blocks, b, b] fp32 = per block x^T grad, from x and the gradient of the rotated x [M, K]."""
    if x.shape != grad.shape or x.dim() != 2 or x.shape[1] != blocks * b:
        raise ValueError(f"x {tuple(x.shape)} and grad {tuple(grad.shape)} must be one [M, {blocks * b}] shape")
    grad_rot = torch.empty(blocks, b, b, dtype=torch.float32)
    module().oft_rotation_grad(
        x=_host(x, "x"),
        x_dtype=DTYPE_CODES[x.dtype],
        grad=_host(grad, "grad"),
        grad_dtype=DTYPE_CODES[grad.dtype],
        rows=x.shape[0],
        blocks=blocks,
        block_size=b,
        grad_rot=_host(grad_rot, "grad_rot"),
    )
    return grad_rot


@functools.cache
def _moment_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(signed then unsigned dynamic map [512], their first-code tables [2 * 65536] int32, their
    midpoints with +inf [2 * 256]): ``moments8``'s lookup, as the kernel reads it."""
    cpu = torch.device("cpu")
    maps = torch.cat([formats.dynamic_map(cpu), formats.unsigned_dynamic_map(cpu)]).contiguous()
    lookups = [moments8._code_lookup(signed, cpu) for signed in (True, False)]
    first = torch.cat([f for f, _ in lookups]).to(torch.int32).contiguous()
    mids = torch.cat([m for _, m in lookups]).to(torch.float32).contiguous()
    return maps, first, mids


def adamw_step(param, grad, state: dict, scalars: list[float]) -> None:
    """One AdamW step of ``param`` (in place) and its ``state`` (fp32 ``exp_avg``/``exp_avg_sq``, or 8-bit
    codes with ``*_absmax``); ``scalars`` is ``qft.kernels.adamw.host_scalars``' row."""
    from qft.kernels import adamw as k  # the scalar row's layout

    numel = param.numel()
    eight = "exp_avg_absmax" in state
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    state_dtype = torch.uint8 if eight else torch.float32
    if grad.numel() != numel or any(t.numel() != numel or t.dtype != state_dtype for t in (exp_avg, exp_avg_sq)):
        raise ValueError("param, grad and the moments must hold the same number of values")
    maps, first, mids = _moment_tables() if eight else (None, None, None)
    module().adamw_step(
        p=_host(param, "param"),
        p_dtype=DTYPE_CODES[param.dtype],
        g=_host(grad, "grad"),
        g_dtype=DTYPE_CODES[grad.dtype],
        exp_avg=_host(exp_avg, "exp_avg"),
        exp_avg_sq=_host(exp_avg_sq, "exp_avg_sq"),
        m_absmax=_host(state.get("exp_avg_absmax"), "exp_avg_absmax"),
        v_absmax=_host(state.get("exp_avg_sq_absmax"), "exp_avg_sq_absmax"),
        numel=numel,
        decay=scalars[int(k.DECAY)],
        w1=scalars[int(k.W1)],
        beta2=scalars[int(k.BETA2)],
        w2=scalars[int(k.W2)],
        bc2_sqrt=scalars[int(k.BC2_SQRT)],
        eps=scalars[int(k.EPS)],
        neg_step=scalars[int(k.NEG_STEP)],
        sign=scalars[int(k.SIGN)],
        maps=_host(maps, "maps"),
        first=_host(first, "first"),
        mids=_host(mids, "mids"),
    )
