"""QuantConfig, the frozen config users hold for how to quantize (adapter configs live with their
adapters in ``qft.adapters``)."""

from __future__ import annotations

from dataclasses import dataclass

from qft import formats


@dataclass(frozen=True)
class QuantConfig:
    """How ``quantize_`` / ``QuantLinear.from_linear`` store a weight.

    Attributes:
        format: a name in ``qft.formats.FORMATS``: ``"nf4"`` (default), ``"fp4"``, ``"lloyd3"``,
            ``"lloyd2"``, ``"nf3"``, ``"nf2"``, ``"int4"``, ``"int3"``, ``"int2"``, ``"nf4_icq"``,
            ``"lloyd3_icq"``, ``"lloyd2_icq"``.
        block_size: values per scale block (default 64; affine groups 32/64/128).
        double_quant: also quantize the scales to 8 bits (default True; 4.127 bits/param for nf4/64).
        method: affine formats' ranges: ``"rtn"``, ``"clip"`` or ``"hqq"`` (default); ``"icq"`` (IR-QLoRA's
            entropy-maximising ranges; nf4, lloyd3, lloyd2 are stored as their ``_icq`` variants, with an
            offset per block, and ``format`` reads as that variant); or ``"gptq"`` (every format: its
            scales, then GPTQ's error feedback; needs ``quantize_``'s ``calibration``). For ICQ with GPTQ,
            name an ``_icq`` format with ``"gptq"``.
        act_order: gptq only: round the columns in descending order of the calibration inputs' energy.
    """

    format: str = "nf4"
    block_size: int = formats.DEFAULT_BLOCK_SIZE
    double_quant: bool = True
    method: str = "hqq"
    act_order: bool = False

    def __post_init__(self) -> None:
        formats.get_format(self.format)
        formats.check_block_size(self.block_size, self.format)
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {self.double_quant!r}")
        if self.method not in ("rtn", "clip", "hqq", "icq", "gptq"):
            raise ValueError(f"method must be 'rtn', 'clip', 'hqq', 'icq' or 'gptq', got {self.method!r}")
        if self.method == "icq":  # the format the weights are stored in: a code book's _icq variant
            object.__setattr__(self, "format", formats.icq_format(self.format))
        if not isinstance(self.act_order, bool):
            raise TypeError(f"act_order must be a bool, got {self.act_order!r}")
        if self.act_order and self.method != "gptq":
            raise ValueError("act_order applies to method 'gptq' only")
