"""The stored parts of a quantized weight, declared once, and ``Weight``: the parts as one value.

Each format declares what it stores (``stored_parts``: name, dtype, size rule): packed ``codes`` and
``scales`` (one per block) for all, ``zeros`` for affine formats; double quantization (``layout``)
turns ``scales`` into uint8 codes and adds ``nested_scales`` and ``offset``. Everything that names
parts (ops, kernels, state dicts, flat FSDP storage, module buffers) reads this declaration instead
of spelling them out; ``STATE_KEYS`` gives each part's state-dict key, unchanged on disk.

``Weight`` travels through the custom ops as three arguments, ``Tensor?[] parts`` (in ``NAMES``
order, None for an absent part), ``str fmt`` and ``int[] meta`` (``[numel, block_size,
nested_block_size]``): ``Weight.op_args()`` and ``Weight.from_op_args`` convert.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from qft.formats import double_quant, packing

# Part names in op-argument order; the state-dict keys they had before the names said what they hold.
NAMES = ("codes", "scales", "zeros", "nested_scales", "offset")
STATE_KEYS = {
    "codes": "packed",
    "scales": "absmax",
    "zeros": "zero",
    "nested_scales": "nested_absmax",
    "offset": "offset",
}


class PartSpec(NamedTuple):
    """What one stored part must be: dtype, element count, and dims (1, or 0 for a scalar)."""

    name: str
    dtype: torch.dtype
    numel: int
    dims: int = 1


def cached(fn):
    """``fn`` memoized (every op call consults it), falling back to a plain call for arguments that
    cannot be hashed (symbolic sizes while ``torch.compile`` traces)."""
    memo = functools.lru_cache(maxsize=1024)(fn)

    @functools.wraps(fn)
    def call(*args):
        try:
            hash(args)
        except TypeError:
            return fn(*args)
        return memo(*args)

    return call


@cached
def codes_and_scales(bits: int, numel: int, block_size: int) -> list[PartSpec]:
    """What every format stores: packed ``codes`` and one fp32 scale per block."""
    return [
        PartSpec("codes", packing.packed_dtype(bits), packing.packed_numel(numel, bits)),
        PartSpec("scales", torch.float32, packing.num_blocks(numel, block_size)),
    ]


def layout(fmt, numel: int, block_size: int, double_quant_: bool, nested_block_size: int) -> tuple[PartSpec, ...]:
    """The parts a weight of ``numel`` values in format ``fmt`` (a format object) stores, in order:
    the format's own (``fmt.stored_parts``), with double quantization turning the fp32 scales into
    uint8 codes plus ``nested_scales`` and ``offset``."""
    specs = list(fmt.stored_parts(numel, block_size))
    if double_quant_:
        scales = next(i for i, s in enumerate(specs) if s.name == "scales")
        blocks = specs[scales].numel
        specs[scales] = specs[scales]._replace(dtype=torch.uint8)
        specs.append(PartSpec("nested_scales", torch.float32, double_quant.nested_blocks(blocks, nested_block_size)))
        specs.append(PartSpec("offset", torch.float32, 1, dims=0))
    return tuple(specs)


class Weight:
    """A quantized weight's parts and the numbers needed to decode them (no shape, no dtype tag).

    ``Weight(parts, fmt, numel, block_size, nested_block_size)``; each part is also an attribute
    (``weight.codes``, ``weight.scales``, ...: None for a part this weight does not store). Built on
    every op call, so it is a plain slotted object.
    """

    __slots__ = ("parts", "fmt", "numel", "block_size", "nested_block_size", *NAMES)

    def __init__(
        self,
        parts: dict[str, torch.Tensor],
        fmt: str,
        numel: int,
        block_size: int,
        nested_block_size: int = double_quant.NESTED_BLOCK_SIZE,
    ) -> None:
        self.parts, self.fmt, self.numel = parts, fmt, numel
        self.block_size, self.nested_block_size = block_size, nested_block_size
        for name in NAMES:
            setattr(self, name, parts.get(name))

    def __eq__(self, other) -> bool:
        """Same format numbers and the very same part tensors (identity: tensors have no truth value)."""
        return (
            isinstance(other, Weight)
            and self.meta() == other.meta()
            and self.fmt == other.fmt
            and self.parts.keys() == other.parts.keys()
            and all(self.parts[n] is other.parts[n] for n in self.parts)
        )

    __hash__ = None

    def __repr__(self) -> str:
        return f"Weight({self.fmt}, numel={self.numel}, block_size={self.block_size}, parts={sorted(self.parts)})"

    @property
    def double_quant(self) -> bool:
        """True when ``scales`` holds 8-bit codes of ``nested_scales`` and ``offset``."""
        return self.nested_scales is not None

    @property
    def device(self) -> torch.device:
        """The device of the codes (all parts live on one)."""
        return self.codes.device

    def meta(self) -> list[int]:
        """``[numel, block_size, nested_block_size]``: the integers of ``op_args``."""
        return [self.numel, self.block_size, self.nested_block_size]

    def op_args(self) -> tuple[list[torch.Tensor | None], str, list[int]]:
        """``(parts, fmt, meta)`` as the ``qft::`` ops take a weight."""
        return [self.codes, self.scales, self.zeros, self.nested_scales, self.offset], self.fmt, self.meta()

    @classmethod
    def from_op_args(cls, parts, fmt: str, meta) -> Weight:
        """The inverse of ``op_args``; ``ValueError`` when the lists have the wrong length."""
        if not isinstance(parts, (list, tuple)) or len(parts) != len(NAMES):
            raise ValueError(f"parts must be a list of {len(NAMES)} tensors or None ({', '.join(NAMES)})")
        if not isinstance(meta, (list, tuple)) or len(meta) != 3:
            raise ValueError("meta must be [numel, block_size, nested_block_size]")
        present = {n: t for n, t in zip(NAMES, parts, strict=True) if t is not None}
        return cls(present, fmt, *(int(v) for v in meta))

    def map(self, fn) -> Weight:
        """A copy with ``fn`` applied to every part (moves, contiguous copies, clones)."""
        parts = {n: fn(t) for n, t in self.parts.items()}
        return Weight(parts, self.fmt, self.numel, self.block_size, self.nested_block_size)
