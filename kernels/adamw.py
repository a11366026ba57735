"""Triton multi-tensor AdamW step: one launch updates every parameter of one (param dtype, grad dtype)
kind, with fp32 or blockwise 8-bit moments, and never synchronizes with the host.

The launcher writes three small tables (built on the host from values it already has, copied
asynchronously from pinned memory): per tensor its addresses (param, grad, moments, 8-bit absmax) and
numel, per tensor its fp32 scalars (AdamW's factors after bias correction, computed on the host the
way ``torch.optim.AdamW`` computes them), and per program the (tensor, first element) of its chunk.
The update mirrors ``qft.optim.adamw.PagedAdamW._update`` (torch's single-tensor AdamW) op for op;
8-bit moments are decoded, updated and re-encoded like ``qft.optim.quant_state``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import interpreting
from .decode import store_rounded

CHUNK = 2048  # elements a program updates; a multiple of the 8-bit state's block
QBLOCK = 256  # qft.optim.quant_state.BLOCK
ABSMAX_FLOOR = tl.constexpr(1e-38)  # qft.formats.ABSMAX_FLOOR (a constexpr: kernels may read it)
# Table columns, constexprs so that the kernel and the host read the same names.
# Per-tensor scalars:
DECAY, W1, BETA2, W2, NEG_STEP, BC2_SQRT, EPS, SIGN, WD, INV_BC1 = (tl.constexpr(i) for i in range(10))
SCALARS = tl.constexpr(10)
# Per-tensor addresses (exp_avg absmax columns for 8-bit state only; LR_ADDR 0 unless lr is a device tensor):
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, EXP_AVG_ABSMAX, EXP_AVG_SQ_ABSMAX, LR_ADDR = (tl.constexpr(i) for i in range(7))
ADDRESSES = tl.constexpr(7)

_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _load_float(addr, offs, mask, KIND: tl.constexpr, BY_HAND: tl.constexpr):
    """fp32 values of a float32 (0), float16 (1) or bfloat16 (2) tensor at address ``addr``."""
    if KIND == 0:
        return tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    elif KIND == 1:
        return tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
    elif BY_HAND:  # the interpreter: read the bf16 bits and widen them
        bits = tl.load(addr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(addr.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_float(addr, offs, values, mask, KIND: tl.constexpr, BY_HAND: tl.constexpr):
    """Store fp32 ``values`` rounded to nearest even in the tensor's dtype (``decode.store_rounded``,
    which rounds bf16 by hand in the interpreter)."""
    if KIND == 0:
        store_rounded(addr.to(tl.pointer_type(tl.float32)), offs, values, mask, False)
    elif KIND == 1:
        store_rounded(addr.to(tl.pointer_type(tl.float16)), offs, values, mask, False)
    elif BY_HAND:
        store_rounded(addr.to(tl.pointer_type(tl.int16)), offs, values, mask, True)
    else:
        store_rounded(addr.to(tl.pointer_type(tl.bfloat16)), offs, values, mask, False)


@triton.jit
def _adamw(p, g, m, v, s_ptr, lr_addr):
    """One AdamW update in torch's op order: p *= 1 - lr wd; m = lerp(m, g, 1 - beta1);
    v = v beta2 + (1 - beta2) g g; p += -step_size * m / (sqrt(v) / sqrt(bc2) + eps)."""
    decay = tl.load(s_ptr + DECAY)
    w1 = tl.load(s_ptr + W1)
    neg_step = tl.load(s_ptr + NEG_STEP)
    if lr_addr != 0:  # a tensor lr on the device: the factors that need it are formed here
        lr = tl.load(lr_addr.to(tl.pointer_type(tl.float32)))
        decay = 1.0 - lr * tl.load(s_ptr + WD)
        neg_step = -(lr * tl.load(s_ptr + INV_BC1))
    g = g * tl.load(s_ptr + SIGN)  # maximize: -1
    p = p * decay
    # torch's lerp and addcmul round once (fused multiply-add); addcdiv is p + (value * m) / denom.
    m = tl.where(w1 < 0.5, tl.fma(w1, g - m, m), tl.fma(w1 - 1.0, g - m, g))
    v = v * tl.load(s_ptr + BETA2)
    v = tl.fma(tl.load(s_ptr + W2) * g, g, v)
    denom = tl.div_rn(tl.sqrt_rn(v), tl.load(s_ptr + BC2_SQRT)) + tl.load(s_ptr + EPS)
    p = p + tl.div_rn(neg_step * m, denom)
    return p, m, v


@triton.jit
def _encode(values, midpoints_ptr):
    """8-bit codes of ``values`` [blocks, QBLOCK] scaled by their block absmax: the index of the
    nearest map entry, i.e. the number of sorted midpoints below the scaled value (binary search)."""
    absmax = tl.max(tl.abs(values), axis=1)
    # The floor as an fp32 tensor: Triton < 3.7 reads a float literal below fp32's normal range as fp64.
    scaled = tl.div_rn(values, tl.maximum(absmax, tl.full((), ABSMAX_FLOOR, tl.float32))[:, None])
    lo = tl.zeros(values.shape, dtype=tl.int32)
    for i in tl.static_range(8):
        step = 1 << (7 - i)
        probe = lo + step - 1
        mid = tl.load(midpoints_ptr + probe, mask=probe < 255, other=float("inf"))
        lo = tl.where(mid < scaled, lo + step, lo)
    return lo.to(tl.uint8), absmax


@triton.jit
def _step_fp32_state(
    p_addr,
    g_addr,
    m_addr,
    v_addr,
    lr_addr,
    s_ptr,
    start,
    numel,
    P_KIND: tl.constexpr,
    G_KIND: tl.constexpr,
    BY_HAND: tl.constexpr,
    CHUNK: tl.constexpr,
):
    offs = start + tl.arange(0, CHUNK)
    mask = offs < numel
    p = _load_float(p_addr, offs, mask, P_KIND, BY_HAND)
    g = _load_float(g_addr, offs, mask, G_KIND, BY_HAND)
    m_ptr = m_addr.to(tl.pointer_type(tl.float32))
    v_ptr = v_addr.to(tl.pointer_type(tl.float32))
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p, m, v = _adamw(p, g, m, v, s_ptr, lr_addr)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    _store_float(p_addr, offs, p, mask, P_KIND, BY_HAND)


@triton.jit
def _step_8bit_state(
    p_addr,
    g_addr,
    m_addr,
    v_addr,
    m_absmax_addr,
    v_absmax_addr,
    lr_addr,
    s_ptr,
    start,
    numel,
    signed_map_ptr,
    unsigned_map_ptr,
    signed_mid_ptr,
    unsigned_mid_ptr,
    P_KIND: tl.constexpr,
    G_KIND: tl.constexpr,
    BY_HAND: tl.constexpr,
    CHUNK: tl.constexpr,
    QBLOCK: tl.constexpr,
):
    # CHUNK // QBLOCK inline: plain constexpr arithmetic, which every Triton 3.x accepts (GPU machine: 3.6)
    block_ids = start // QBLOCK + tl.arange(0, CHUNK // QBLOCK)
    offs = start + tl.arange(0, CHUNK // QBLOCK)[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    mask = offs < numel
    block_ok = block_ids * QBLOCK < numel
    p = _load_float(p_addr, offs, mask, P_KIND, BY_HAND)
    g = _load_float(g_addr, offs, mask, G_KIND, BY_HAND)
    m_codes = m_addr.to(tl.pointer_type(tl.uint8))
    v_codes = v_addr.to(tl.pointer_type(tl.uint8))
    m_absmax = m_absmax_addr.to(tl.pointer_type(tl.float32))
    v_absmax = v_absmax_addr.to(tl.pointer_type(tl.float32))
    m = tl.load(signed_map_ptr + tl.load(m_codes + offs, mask=mask, other=0).to(tl.int32))
    m = m * tl.load(m_absmax + block_ids, mask=block_ok, other=0.0)[:, None]
    v = tl.load(unsigned_map_ptr + tl.load(v_codes + offs, mask=mask, other=0).to(tl.int32))
    v = v * tl.load(v_absmax + block_ids, mask=block_ok, other=0.0)[:, None]
    p, m, v = _adamw(p, g, m, v, s_ptr, lr_addr)
    # Padding past numel must not enter a block's absmax (the reference pads with zeros), nor may a
    # NaN (one NaN gradient would poison its whole block): both are stored as 0, as the reference does.
    m = tl.where(mask & (m == m), m, 0.0)
    v = tl.where(mask & (v == v), v, 0.0)
    codes, absmax = _encode(m, signed_mid_ptr)
    tl.store(m_codes + offs, codes, mask=mask)
    tl.store(m_absmax + block_ids, absmax, mask=block_ok)
    codes, absmax = _encode(v, unsigned_mid_ptr)
    tl.store(v_codes + offs, codes, mask=mask)
    tl.store(v_absmax + block_ids, absmax, mask=block_ok)
    _store_float(p_addr, offs, p, mask, P_KIND, BY_HAND)


@triton.jit
def _adamw_multi_kernel(
    addr_ptr,  # [T, ADDRESSES] int64
    numel_ptr,  # [T] int64
    scalar_ptr,  # [T, SCALARS] fp32
    eight_ptr,  # [T] int32: 1 when the tensor's moments are 8-bit
    chunk_ptr,  # [programs, 2] int64: tensor index, first element
    signed_map_ptr,
    unsigned_map_ptr,
    signed_mid_ptr,
    unsigned_mid_ptr,
    P_KIND: tl.constexpr,
    G_KIND: tl.constexpr,
    BY_HAND: tl.constexpr,
    CHUNK: tl.constexpr,
    QBLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunk_ptr + 2 * pid)
    start = tl.load(chunk_ptr + 2 * pid + 1)
    numel = tl.load(numel_ptr + t)
    row = addr_ptr + t * ADDRESSES
    p_addr, g_addr = tl.load(row + PARAM), tl.load(row + GRAD)
    m_addr, v_addr = tl.load(row + EXP_AVG), tl.load(row + EXP_AVG_SQ)
    lr_addr = tl.load(row + LR_ADDR)
    s_ptr = scalar_ptr + t * SCALARS
    # The two kinds of state have tiles of different shapes: each lives in its own function.
    if tl.load(eight_ptr + t) == 0:
        _step_fp32_state(p_addr, g_addr, m_addr, v_addr, lr_addr, s_ptr, start, numel, P_KIND, G_KIND, BY_HAND, CHUNK)
    else:
        m_absmax, v_absmax = tl.load(row + EXP_AVG_ABSMAX), tl.load(row + EXP_AVG_SQ_ABSMAX)
        _step_8bit_state(
            p_addr,
            g_addr,
            m_addr,
            v_addr,
            m_absmax,
            v_absmax,
            lr_addr,
            s_ptr,
            start,
            numel,
            signed_map_ptr,
            unsigned_map_ptr,
            signed_mid_ptr,
            unsigned_mid_ptr,
            P_KIND,
            G_KIND,
            BY_HAND,
            CHUNK,
            QBLOCK,
        )


def host_scalars(lr, beta1, beta2, eps, weight_decay, maximize, step) -> list[float]:
    """One tensor's scalar row, formed as ``torch.optim.AdamW`` forms its Python scalars (doubles,
    rounded to fp32 when the table is written, as torch's fp32 kernels round them)."""
    lr_value = 0.0 if isinstance(lr, torch.Tensor) else lr
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    row = [0.0] * int(SCALARS)
    row[DECAY], row[W1], row[BETA2], row[W2] = 1 - lr_value * weight_decay, 1 - beta1, beta2, 1 - beta2
    row[NEG_STEP], row[BC2_SQRT], row[EPS] = -(lr_value / bias_correction1), math.sqrt(bias_correction2), eps
    row[SIGN], row[WD], row[INV_BC1] = -1.0 if maximize else 1.0, weight_decay, 1 / bias_correction1
    return row


def _to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (or tensor) on the device without a host synchronization (pinned, asynchronous copy)."""
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class LaunchPlan:
    """The tables of one fused launch that do not change from step to step (each tensor's addresses,
    size and kind of state, and the chunk of every program), on the device, built once for a set of
    tensors and reused while none of them moves. Per step only the scalar rows travel.

    ``entries``: dicts with ``param``, ``grad``, ``exp_avg``, ``exp_avg_sq``, optional ``*_absmax``
    (8-bit state) and optional device ``lr`` tensor; one param dtype, one grad dtype, one device. The
    plan keeps their addresses, not the tensors: whoever launches it keeps them alive and checks
    that none has moved (``PagedAdamW`` compares every parameter's and gradient's address).
    """

    def __init__(self, entries: list[dict]):
        if not entries:
            raise ValueError("a launch plan needs at least one tensor")
        self.size = len(entries)
        first = entries[0]
        self.device = first["param"].device
        self.p_kind, self.g_kind = _KINDS[first["param"].dtype], _KINDS[first["grad"].dtype]
        addresses, numels, eight, chunks = [], [], [], []
        for t, e in enumerate(entries):
            p, g = e["param"], e["grad"]
            if not (p.is_contiguous() and g.is_contiguous()):
                raise ValueError("the fused AdamW step needs contiguous parameters and gradients")
            is8 = "exp_avg_absmax" in e
            row = [0] * int(ADDRESSES)
            row[PARAM], row[GRAD] = p.data_ptr(), g.data_ptr()
            row[EXP_AVG], row[EXP_AVG_SQ] = e["exp_avg"].data_ptr(), e["exp_avg_sq"].data_ptr()
            if is8:
                row[EXP_AVG_ABSMAX] = e["exp_avg_absmax"].data_ptr()
                row[EXP_AVG_SQ_ABSMAX] = e["exp_avg_sq_absmax"].data_ptr()
            if e.get("lr") is not None:
                row[LR_ADDR] = e["lr"].data_ptr()
            addresses.append(row)
            numels.append(p.numel())
            eight.append(int(is8))
            chunks.append(
                torch.stack(
                    [
                        torch.full(((p.numel() + CHUNK - 1) // CHUNK,), t, dtype=torch.int64),
                        torch.arange(0, p.numel(), CHUNK, dtype=torch.int64),
                    ],
                    dim=1,
                )
            )
        self.programs = sum(c.shape[0] for c in chunks)
        self.addresses = _to_device(addresses, torch.int64, self.device)
        self.numels = _to_device(numels, torch.int64, self.device)
        self.eight = _to_device(eight, torch.int32, self.device)
        self.chunks = _to_device(torch.cat(chunks), torch.int64, self.device)
        self.by_hand = interpreting() and torch.bfloat16 in (first["param"].dtype, first["grad"].dtype)

    def launch(self, scalars: torch.Tensor, maps: tuple[torch.Tensor, ...]) -> None:
        """One step of every tensor: ``scalars`` fp32 ``[T, SCALARS]`` (``host_scalars`` rows) on the host;
        ``maps`` the signed and unsigned dynamic maps and their midpoints on the plan's device."""
        if scalars.shape != (self.size, int(SCALARS)):
            raise ValueError(f"scalars must be [{self.size}, {int(SCALARS)}], got {tuple(scalars.shape)}")
        self.scalars = _to_device(scalars, torch.float32, self.device)  # held until the next launch
        _adamw_multi_kernel[(self.programs,)](
            self.addresses,
            self.numels,
            self.scalars,
            self.eight,
            self.chunks,
            *maps,
            P_KIND=self.p_kind,
            G_KIND=self.g_kind,
            BY_HAND=self.by_hand,
            CHUNK=CHUNK,
            QBLOCK=QBLOCK,
        )


def adamw_step(entries: list[dict], maps: tuple[torch.Tensor, ...]) -> None:
    """Update every entry (as ``LaunchPlan`` takes them, each with its ``scalars`` row from
    ``host_scalars``) in one launch, building the plan for this step only."""
    if not entries:
        return
    LaunchPlan(entries).launch(torch.tensor([e["scalars"] for e in entries], dtype=torch.float32), maps)
