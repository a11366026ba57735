"""Every format qft stores, what each stores, and the reference arithmetic that defines it.

One module per family declares its formats (code books, bit width, quantize and decode rules):

* ``bnb_codebooks``: nf4, fp4 (bitsandbytes' bytes);
* ``searched_codebooks``: lloyd3, lloyd2, nf3, nf2 (3-/2-bit code books, searched block scale);
* ``affine``: int4, int3, int2 (HQQ/GPTQ ``(q - zero) * scale``);
* ``icq``: nf4_icq, lloyd3_icq, lloyd2_icq (a code book with an entropy-chosen offset per block,
  ``(code[q] - zero) * scale``), and the affine formats' ``"icq"`` range;
* ``double_quant``: the 8-bit double quantization of any format's scales;

``packing`` lays codes out per bit width and ``parts`` declares the stored parts and ``Weight``, the
parts as one value. ``quantize`` and ``dequantize`` here are the reference: the CPU path and the
oracle that the Triton and CUDA kernels reproduce bit for bit.
"""

from __future__ import annotations

import torch

from qft.formats import affine, bnb_codebooks, double_quant, icq, packing, searched_codebooks
from qft.formats.codebook import byte_pairs, code, encode_order, thresholds
from qft.formats.double_quant import ABSMAX_FLOOR, NESTED_BLOCK_SIZE, dynamic_map, unsigned_dynamic_map
from qft.formats.packing import num_blocks, packed_dtype, packed_numel
from qft.formats.parts import NAMES as PART_NAMES
from qft.formats.parts import Weight, cached, layout

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what a weight decodes to (and comes from)
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # code books
GROUP_SIZES = affine.GROUP_SIZES
DEFAULT_BLOCK_SIZE = 64
FORMATS = {f.name: f for family in (bnb_codebooks, searched_codebooks, affine) for f in family.FORMATS}
FORMATS.update({f.name: f for f in map(icq.icq_variant, (FORMATS["nf4"], FORMATS["lloyd3"], FORMATS["lloyd2"]))})

__all__ = [
    "ABSMAX_FLOOR",
    "BLOCK_SIZES",
    "DEFAULT_BLOCK_SIZE",
    "FLOAT_DTYPES",
    "FORMATS",
    "GROUP_SIZES",
    "NESTED_BLOCK_SIZE",
    "PART_NAMES",
    "Weight",
    "byte_pairs",
    "check_block_size",
    "check_weight",
    "code",
    "dequantize",
    "dynamic_map",
    "encode_order",
    "encoded",
    "get_bnb_format",
    "get_format",
    "icq_format",
    "is_bnb_codebook",
    "layout",
    "num_blocks",
    "packed_dtype",
    "packed_numel",
    "quantize",
    "stored_names",
    "thresholds",
    "unsigned_dynamic_map",
    "with_double_quant",
]


def get_format(name: str):
    """Look up a format by name; ``ValueError`` naming the choices if it is unknown."""
    if not isinstance(name, str) or name not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {name!r}")
    return FORMATS[name]


def icq_format(name: str) -> str:
    """The format ``method="icq"`` stores a ``name`` weight in: an affine format itself (its range is
    searched), a code book's ``_icq`` variant (its offsets stored as zeros); ``ValueError`` for a code
    book without one."""
    fmt = get_format(name)
    if fmt.affine or isinstance(fmt, icq.IcqCodebookFormat):
        return name
    if f"{name}_icq" not in FORMATS:
        variants = sorted(n for n in FORMATS if n.endswith("_icq"))
        raise ValueError(f"method 'icq' takes an affine format or one of {variants} (or its base), got {name!r}")
    return f"{name}_icq"


def is_bnb_codebook(name: str) -> bool:
    """True for nf4/fp4: the formats bitsandbytes shares, with their own fast 4-bit kernels."""
    return getattr(get_format(name), "bnb_compatible", False)


def get_bnb_format(name: str):
    """A format bitsandbytes also stores (nf4, fp4); ``ValueError`` for the others."""
    if not is_bnb_codebook(name):
        raise ValueError(f"format must be a bitsandbytes code book ('fp4', 'nf4') here, got {name!r}")
    return FORMATS[name]


def check_block_size(block_size: int, fmt: str | None = None) -> int:
    """Validate a block (code-book: 32..4096, powers of two) or group (affine: 32/64/128) size."""
    allowed = GROUP_SIZES if fmt is not None and get_format(fmt).affine else BLOCK_SIZES
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in allowed:
        raise ValueError(f"block_size must be one of {allowed} for this format, got {block_size!r}")
    return block_size


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@cached
def _checked_layout(fmt: str, numel: int, block_size: int, nested: bool, nested_block_size: int):
    """The layout as ``(name, dtype, numel, dims)`` tuples, after checking the numbers (cached: every
    op call checks its weight, and a failed check raises again, uncached)."""
    spec = get_format(fmt)
    check_block_size(block_size, fmt)
    _check_int(numel, "numel", 0)
    _check_int(nested_block_size, "nested_block_size", 1)
    return tuple(tuple(s) for s in layout(spec, numel, block_size, nested, nested_block_size))


def check_weight(weight: Weight) -> Weight:
    """``weight``, or ``ValueError`` naming the part that does not fit its format, size and block size.

    Kernels index by ``numel`` and ``block_size`` alone, so a part of the wrong size, dtype, rank or
    device would be read out of bounds: every decode checks first.
    """
    if not isinstance(weight.fmt, str) or isinstance(weight.numel, bool) or isinstance(weight.block_size, bool):
        get_format(weight.fmt)
        check_block_size(weight.block_size, weight.fmt)
        _check_int(weight.numel, "numel", 0)
    if ("nested_scales" in weight.parts) != ("offset" in weight.parts):
        raise ValueError("nested_scales and offset must be given together")
    specs = _checked_layout(weight.fmt, weight.numel, weight.block_size, weight.double_quant, weight.nested_block_size)
    parts = weight.parts
    if len(parts) == len(specs):
        device = parts["codes"].device if isinstance(parts.get("codes"), torch.Tensor) else None
        for name, dtype, numel, dims in specs:  # the fast path of every op call
            t = parts.get(name)
            fits = isinstance(t, torch.Tensor) and t.dtype == dtype and t.dim() == dims
            if not (fits and t.numel() == numel and t.device == device):
                break
        else:
            return weight
    _explain(weight, specs)
    return weight


def _explain(weight: Weight, specs) -> None:
    """Raise the error that names the first part that does not fit."""
    for name in set(weight.parts) - {s[0] for s in specs}:
        raise ValueError(f"{name} is not a part of a {weight.fmt} weight")
    device = None
    for name, dtype, numel, dims in specs:
        t = weight.parts.get(name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != dims:  # the right count in another shape ([n, 1] scales) would broadcast in a decode
            want = "a 0-dim scalar" if dims == 0 else f"{dims}-D"
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
        if t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
        if t.numel() != numel:
            raise ValueError(f"{name} must hold {numel} values for this shape and block size, got {t.numel()}")
        device = t.device if device is None else device
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but codes are on {device}")


def quantize(w: torch.Tensor, fmt: str, block_size: int, method: str = "hqq", nested: bool = False, **searched):
    """Reference quantization of ``w`` (any shape, fp32/fp16/bf16) into a flat ``Weight``.

    ``searched`` passes ranges a kernel searched (``scales``, and ``zeros`` for affine formats)."""
    return encoded(get_format(fmt).quantize(w, block_size, method, **searched), fmt, w.numel(), block_size, nested)


def encoded(parts: dict[str, torch.Tensor], fmt: str, numel: int, block_size: int, nested: bool) -> Weight:
    """A format's freshly encoded ``parts`` (fp32 scales) as a ``Weight``, double-quantized if ``nested``."""
    return Weight(with_double_quant(parts) if nested else parts, fmt, numel, block_size)


def stored_names(fmt: str, nested: bool) -> list[str]:
    """The names of the parts a ``fmt`` weight stores, in ``PART_NAMES`` order."""
    return [s.name for s in layout(get_format(fmt), 1, DEFAULT_BLOCK_SIZE, nested, NESTED_BLOCK_SIZE)]


def with_double_quant(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``parts`` with fp32 ``scales`` double-quantized (``double_quant``): torch ops on any device,
    the scales being 1/32 of the weight or less."""
    codes, nested, offset = double_quant.quantize(parts["scales"], NESTED_BLOCK_SIZE)
    return {**parts, "scales": codes, "nested_scales": nested, "offset": offset}


def decoded_scales(weight: Weight) -> torch.Tensor:
    """fp32 scales per block: stored, or decoded from the double quantization."""
    if weight.double_quant:
        return double_quant.dequantize(weight.scales, weight.nested_scales, weight.offset, weight.nested_block_size)
    return weight.scales


def dequantize(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    """Reference decode of every value of ``weight`` into a flat ``dtype`` tensor."""
    fmt = get_format(weight.fmt)
    if fmt.bits == 4 and not fmt.stores_zeros and weight.numel:
        return _dequantize_bytes(weight, dtype)
    codes = packing.unpack(weight.codes, fmt.bits, weight.numel)
    return fmt.dequantize(codes, decoded_scales(weight), weight.block_size, dtype, weight.zeros)


# Values per step of the CPU loop: a multiple of every block size, small enough to stay in cache.
_CHUNK = 1 << 20


def _dequantize_bytes(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    """4-bit code books, two values per gather (``byte_pairs``), chunked: the same values as the
    generic decode, several times faster on CPU."""
    pairs = byte_pairs(weight.fmt, weight.device)
    scales, bs, numel = decoded_scales(weight), weight.block_size, weight.numel
    out = torch.empty(numel, dtype=dtype, device=weight.device)
    for start in range(0, numel, _CHUNK):
        count = min(_CHUNK, numel - start)
        chunk = weight.codes[start // 2 : start // 2 + packed_numel(count)]
        values = torch.index_select(pairs, 0, chunk.int()).view(torch.float32)
        chunk_scales = scales[start // bs : start // bs + num_blocks(count, bs)]
        scaled = packing.blocks(values, bs)[: chunk_scales.numel()] * chunk_scales.unsqueeze(1)
        out[start : start + count] = scaled.reshape(-1)[:count]  # copy_ rounds to nearest even
    return out
