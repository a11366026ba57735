import bitsandbytes.functional as bnb_functional
import pytest
import torch

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
