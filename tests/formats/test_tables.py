"""The formats: code books, tables, NormalFloat construction, block rules, and the declared parts."""

import bitsandbytes.functional as bnb_functional
import pytest
import torch

import qft
from qft import formats


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_code_books_are_bitsandbytes_tables(name):
    assert torch.equal(formats.code(name), bnb_functional.get_4bit_type(name, device="cpu"))


def test_dynamic_map_is_bitsandbytes_signed_map():
    dmap = formats.dynamic_map()
    assert torch.equal(dmap, bnb_functional.create_dynamic_map(signed=True))
    assert dmap.numel() == 256 and bool((dmap[1:] >= dmap[:-1]).all())


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_thresholds_are_midpoints_in_ascending_order(name):
    ordered = formats.code(name)[list(formats.get_format(name).encode_order)]
    assert bool((ordered[1:] >= ordered[:-1]).all()), "encode_order must sort the code book"
    t = formats.thresholds(name)
    assert t.shape == (15,) and torch.equal(t, (ordered[:-1] + ordered[1:]) / 2)


def test_zero_codes():
    assert formats.get_format("nf4").zero_code == 7
    assert formats.get_format("fp4").zero_code == 0


def test_tables_are_cached_per_device():
    assert formats.code("nf4", "cpu") is formats.code("nf4", torch.device("cpu"))


@pytest.mark.parametrize("bad", [16, 48, 8192, 0, -64, 64.0, True, "64"])
def test_bad_block_size_is_named(bad):
    with pytest.raises(ValueError, match="block_size"):
        formats.check_block_size(bad)


def test_unknown_format_lists_choices():
    with pytest.raises(ValueError, match=r"format must be one of \['fp4', 'int2', 'int3', 'int4', 'lloyd2'"):
        formats.get_format("int5")


def test_counts():
    assert formats.num_blocks(129, 64) == 3
    assert formats.packed_numel(5) == 3


def test_normal_float_construction_gives_bitsandbytes_nf4():
    from qft.formats.codebook import normal_float

    assert torch.equal(torch.tensor(normal_float(4)), bnb_functional.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("name, bits", [("nf3", 3), ("nf2", 2)])
def test_nf3_nf2_are_normal_quantiles(name, bits):
    from statistics import NormalDist

    table = formats.code(name)
    size = 2**bits
    assert table.numel() == size and bool((table[1:] > table[:-1]).all())
    assert table[0] == -1 and table[-1] == 1 and int((table == 0).sum()) == 1
    assert int((table > 0).sum()) == size // 2 and int((table < 0).sum()) == size // 2 - 1  # lopsided as NF4
    offset = round((1 - 1 / (2 * (size - 1)) + 1 - 1 / (2 * size)) / 2, 7)
    ppf = NormalDist().inv_cdf  # an implementation independent of the one under test
    positive = [ppf(offset + (0.5 - offset) * i / (size // 2)) for i in range(size // 2)]
    negative = [-ppf(offset + (0.5 - offset) * i / (size // 2 - 1)) for i in range(size // 2 - 1)]
    want = torch.tensor(sorted([*positive, 0.0, *negative]), dtype=torch.float64)
    torch.testing.assert_close(table.double(), want / want.max(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
@pytest.mark.parametrize("double_quant", [False, True])
def test_every_part_is_derived_from_the_format_declaration(fmt, double_quant):
    block_size = 64
    qt = qft.quantize(torch.randn(7, 96), fmt, block_size, double_quant)
    specs = formats.layout(formats.get_format(fmt), qt.numel, block_size, double_quant, formats.NESTED_BLOCK_SIZE)
    assert [s.name for s in specs] == list(qt.parts)
    for spec in specs:
        part = qt.parts[spec.name]
        assert (part.dtype, part.numel(), part.dim()) == (spec.dtype, spec.numel, spec.dims), spec
    assert qt.nbytes == sum(s.numel * torch.empty((), dtype=s.dtype).element_size() for s in specs)
    skeleton = qft.QuantizedTensor.empty(qt.shape, qt.dtype, fmt, block_size, double_quant)
    assert {n: (t.dtype, t.shape) for n, t in skeleton.parts.items()} == {
        n: (t.dtype, t.shape) for n, t in qt.parts.items()
    }
    moved = qt.to("meta")
    assert set(moved.parts) == set(qt.parts) and all(t.is_meta for t in moved.parts.values())
    assert len(qt.state_dict()) == len(specs) + 1  # the parts and the JSON metadata
