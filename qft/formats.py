"""Every code book, bit width, block rule and packing layout qft knows: the one source of truth.

4-bit code-book formats (``nf4``, ``fp4``) store bitsandbytes 0.50.2's bytes (the exceptions, all in
qft's favour of accuracy, are listed under double quantization and partial blocks below):

* Blocks: the weight is flattened row-major and cut into blocks of ``block_size`` values
  (32..4096, a power of two, default 64); the last block may be partial. Each block stores its
  fp32 absmax (max |x|).
* Encode: ``s = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)`` in fp32 for full blocks; the
  partial tail block uses ``x / max(absmax, 1e-38)`` instead, as bitsandbytes' CPU path does (the
  two can differ by one ulp). The code is the number of thresholds strictly below ``s``
  (thresholds are the fp32 midpoints of adjacent code values in ascending order, so a tie takes
  the lower code), mapped through the format's ``encode_order``.
* Pack: value ``2j`` goes to the high nibble of byte ``j``, value ``2j+1`` to the low nibble; an
  odd count is padded with the format's zero code. ``(n + 1) // 2`` bytes.
* Decode: ``code[q] * absmax`` in fp32, rounded (to nearest even) to the output dtype. Subnormal
  results stay subnormal (bitsandbytes' AVX-512 bf16 CPU path flushes them to zero).

FP4 signed zero: bitsandbytes' CPU path gives ``0 < s <= 0.0026`` the code of -0.0 (8) and
``-0.0026 < s <= 0`` the code of +0.0 (0); its CUDA path follows the sign of ``s``. qft follows
the CPU path (the oracle it is tested against); both codes decode to zero.

3- and 2-bit formats, two families (``qft/reference_lowbit.py`` holds their arithmetic):

* code-book ``lloyd3`` / ``lloyd2``: absmax-scaled tables like nf4, decoded by the same rule
  (``code[q] * scale``); the tables are Lloyd-Max quantizers of N(0,1) weights scaled by their
  block-64 absmax (2^22 samples, symmetric, 300 iterations; ``benchmarks/bench_quality.py`` measures
  them). They beat the QLoRA-style NF-k construction, which is lopsided at 2 bits
  ({-1, 0, 0.338, 1}). At quantize time each block's scale is chosen from ``absmax * f``,
  f in ``SCALE_SEARCH`` (least squared error), so the stored "absmax" is a scale <= absmax.
* affine ``int4`` / ``int3`` / ``int2`` (HQQ/GPTQ semantics): ``x = (q - zero) * scale`` per group of
  32/64/128 values, q in [0, 2^bits); scale fp32 (or double-quantized like absmax), zero fp16.
  Quantize picks the range by ``method``: ``"rtn"`` min-max, ``"clip"`` MSE search over shrunken
  ranges, ``"hqq"`` clip then HQQ's half-quadratic zero refinement.

Packing along the flattened weight: 4-bit two codes per byte (above); 3-bit bit-planar, per 32 values
three int32 words: word 0 holds the low 2 bits of values 0..15 (value i at bits 2i, 2i+1), word 1
those of values 16..31, word 2 the high bit of value i at bit i (exactly 3.0 bits, no value
straddles a word); 2-bit sixteen values per int32 word (value i at bits 2i, 2i+1). A partial last
group of 32 (or 16) is padded with the format's zero code.

Double quantization (bitsandbytes' ``compress_statistics``): ``offset = mean(absmax)``; the
centred absmax is quantized in blocks of 256 with the signed 8-bit dynamic map, scaled by each
block's fp32 absmax. qft picks the nearest code (exact, in fp64), where bitsandbytes' CPU path uses
a lookup table that is only approximately nearest (0.2% of codes differ on normal weights); when all
scales are equal qft stores code 127 and bitsandbytes 0 (both decode alike). Decode:
``code8[q] * absmax2 + offset``, each step rounded to fp32.

A partial last block whose values are all zero or subnormal keeps its true absmax (0, or the
subnormal maximum), where bitsandbytes stores 1e-38; qft then decodes subnormal FP4 values that
bitsandbytes loses. Everything else above is byte-identical to bitsandbytes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_BLOCK_SIZE = 64
NESTED_BLOCK_SIZE = 256
# bitsandbytes clamps absmax to this before taking its reciprocal (all-zero blocks).
ABSMAX_FLOOR = 1e-38


@dataclass(frozen=True)
class CodebookFormat:
    """A 4-bit absmax-scaled lookup-table format.

    ``code[i]`` is the value of nibble ``i`` (in units of the block absmax). ``encode_order`` lists
    the nibbles in ascending order of value; encoding counts thresholds in that order.
    """

    name: str
    bits: int
    code: tuple[float, ...]
    encode_order: tuple[int, ...]
    affine = False

    @property
    def zero_code(self) -> int:
        """The code that 0.0 encodes to, used to pad a partial word."""
        return encode_position_of_zero(self)


@dataclass(frozen=True)
class AffineFormat:
    """An integer format ``x = (q - zero) * scale`` per group, q in [0, 2**bits)."""

    name: str
    bits: int
    affine = True
    zero_code = 0

    @property
    def max_code(self) -> int:
        """The largest code, ``2**bits - 1``."""
        return 2**self.bits - 1


def encode_position_of_zero(fmt: CodebookFormat) -> int:
    """Return the nibble ``fmt`` assigns to an exact 0.0 (the count of thresholds below 0)."""
    below = int((thresholds(fmt.name) < 0).sum())
    return fmt.encode_order[below]


# The NF4 table of bitsandbytes (create_normal_map(offset=0.9677083)); nibble i -> value.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# bitsandbytes' FP4: bit 3 is the sign, bits 0-2 index these magnitudes (before /12).
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


def _fp4_code() -> tuple[float, ...]:
    # Divide in fp32, as bitsandbytes builds its table, so every value is bit-identical.
    raw = torch.tensor(list(_FP4_MAGNITUDES) + [-m for m in _FP4_MAGNITUDES], dtype=torch.float32)
    return tuple((raw / 12.0).tolist())


# FP4 nibbles by ascending value. +0.0 (0) precedes -0.0 (8): the bitsandbytes CPU tie order.
_FP4_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)

# Lloyd-Max tables for block-64 absmax-scaled N(0,1) weights (positive half; symmetric).
_LLOYD3 = (0.0943947, 0.291785, 0.5201229, 0.8326523)
_LLOYD2 = (0.1782987, 0.6022794)


def _symmetric(half: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(-v for v in reversed(half)) + half


FORMATS: dict[str, CodebookFormat | AffineFormat] = {
    "nf4": CodebookFormat("nf4", 4, _NF4, tuple(range(16))),
    "fp4": CodebookFormat("fp4", 4, _fp4_code(), _FP4_ORDER),
    "lloyd3": CodebookFormat("lloyd3", 3, _symmetric(_LLOYD3), tuple(range(8))),
    "lloyd2": CodebookFormat("lloyd2", 2, _symmetric(_LLOYD2), tuple(range(4))),
    "int4": AffineFormat("int4", 4),
    "int3": AffineFormat("int3", 3),
    "int2": AffineFormat("int2", 2),
}
GROUP_SIZES = (32, 64, 128)  # affine formats
# Scale candidates (fractions of the block absmax) searched when quantizing lloyd3/lloyd2.
SCALE_SEARCH = tuple(0.7 + 0.025 * i for i in range(13))


def get_format(name: str) -> CodebookFormat | AffineFormat:
    """Look up a format by name; ``ValueError`` naming the choices if it is unknown."""
    if not isinstance(name, str) or name not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {name!r}")
    return FORMATS[name]


def is_4bit_codebook(name: str) -> bool:
    """True for nf4/fp4: the bitsandbytes-compatible formats with their own 4-bit ops and kernels."""
    fmt = get_format(name)
    return not fmt.affine and fmt.bits == 4


def get_4bit_format(name: str) -> CodebookFormat:
    """A 4-bit code-book format (nf4, fp4): the ones bitsandbytes shares and the 4-bit ops serve."""
    fmt = get_format(name)
    if not is_4bit_codebook(name):
        raise ValueError(f"format must be a 4-bit code-book format ('fp4', 'nf4') here, got {name!r}")
    return fmt


def check_block_size(block_size: int, fmt: str | None = None) -> int:
    """Validate a block (code-book: 32..4096, powers of two) or group (affine: 32/64/128) size."""
    allowed = GROUP_SIZES if fmt is not None and get_format(fmt).affine else BLOCK_SIZES
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in allowed:
        raise ValueError(f"block_size must be one of {allowed} for this format, got {block_size!r}")
    return block_size


def num_blocks(numel: int, block_size: int) -> int:
    """Number of (possibly partial) blocks covering ``numel`` values."""
    return -(-numel // block_size)


def packed_numel(numel: int, bits: int = 4) -> int:
    """Elements of the packed tensor for ``numel`` codes: bytes (4-bit) or int32 words (3-, 2-bit)."""
    if bits == 4:
        return (numel + 1) // 2
    if bits == 3:
        return 3 * (-(-numel // 32))
    if bits == 2:
        return -(-numel // 16)
    raise ValueError(f"no packing for {bits}-bit codes")


def packed_dtype(bits: int) -> torch.dtype:
    """uint8 for 4-bit (bitsandbytes' layout), int32 words for 3- and 2-bit."""
    return torch.uint8 if bits == 4 else torch.int32


@functools.cache
def _code_cpu(name: str) -> torch.Tensor:
    fmt = get_format(name)
    if fmt.affine:
        raise ValueError(f"{name} is affine: it has no code book")
    return torch.tensor(fmt.code, dtype=torch.float32)


@functools.cache
def _thresholds_cpu(name: str) -> torch.Tensor:
    fmt = get_format(name)
    if fmt.affine:
        raise ValueError(f"{name} is affine: it has no code book")
    ordered = _code_cpu(name)[list(fmt.encode_order)]
    return (ordered[:-1] + ordered[1:]) / 2  # fp32 midpoints: (a + b) rounded, then exact /2


@functools.cache
def _encode_order_cpu(name: str) -> torch.Tensor:
    return torch.tensor(get_format(name).encode_order, dtype=torch.int32)


@functools.lru_cache(maxsize=64)
def _on_device(table, name: str, device: torch.device) -> torch.Tensor:
    # Kernels read these tables on every call: copy each to a device once, not per launch.
    return table(name).to(device)


def _table(table, name: str, device) -> torch.Tensor:
    get_format(name)
    return _on_device(table, name, torch.device(device))


@functools.cache
def _byte_pairs_cpu(name: str) -> torch.Tensor:
    values = _code_cpu(name)
    pairs = torch.stack([values.repeat_interleave(16), values.repeat(16)], dim=1)  # [256, 2]
    return pairs.contiguous().view(torch.int64).view(256)


def byte_pairs(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """``int64 [256]``: packed byte -> its two fp32 values (high nibble first) in one 8-byte word.

    One gather per byte decodes two values; ``.view(torch.float32)`` on the result splits them.
    """
    return _table(_byte_pairs_cpu, name, device)


def code(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The format's fp32 code book, ``[16]``, indexed by nibble."""
    return _table(_code_cpu, name, device)


def thresholds(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 15 fp32 decision thresholds between adjacent codes, in ascending order."""
    return _table(_thresholds_cpu, name, device)


def encode_order(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """``int32 [16]``: position among ascending thresholds -> nibble."""
    return _table(_encode_order_cpu, name, device)


@functools.cache
def _unsigned_dynamic_map_cpu(_name: str = "dynamic_unsigned") -> torch.Tensor:
    # The unsigned 8-bit dynamic map (bitsandbytes' create_dynamic_map(signed=False)): the signed
    # construction without its negative half, one more fraction bit per decade: 7 decades holding
    # the 2**(i+1) midpoints of linspace(0.1, 1, 2**(i+1) + 1) scaled by 10**(i-6), plus 0 and 1.
    values: list[float] = []
    for decade in range(7):
        edges = torch.linspace(0.1, 1, 2 ** (decade + 1) + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (decade - 6) * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def unsigned_dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The unsigned 8-bit dynamic map (8-bit optimizers' second moment), ``fp32 [256]`` ascending."""
    return _on_device(_unsigned_dynamic_map_cpu, "dynamic_unsigned", torch.device(device))


def _dynamic_map_cpu(_name: str = "dynamic") -> torch.Tensor:
    # Signed 8-bit dynamic map (Dettmers 2015, "8-Bit Approximations for Parallelism in Deep
    # Learning"): 7 decades 1e-6..1; decade i holds the 2**i midpoints of linspace(0.1, 1, 2**i + 1)
    # scaled by 10**(i-6), both signs, plus 0 and 1.0: 256 values, sorted. Built in fp32 step by
    # step so the values are bit-identical to bitsandbytes' create_dynamic_map(signed=True).
    values: list[float] = []
    for decade in range(7):
        edges = torch.linspace(0.1, 1, 2**decade + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (decade - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic map used for double quantization, ``fp32 [256]`` ascending."""
    return _on_device(_dynamic_map_cpu, "dynamic", torch.device(device))
