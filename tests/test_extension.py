"""The CUDA extension builds wherever nvcc is, imports without a GPU, and fails cleanly there."""

import shutil

import pytest
import torch

from qft._extension import extension


def test_extension_built_where_nvcc_exists():
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc: the extension is optional")
    ext = extension()
    assert ext.module is not None, f"qft._C did not import: {ext.error}"
    assert ext.module.runtime_version() >= 11000


def test_no_gpu_is_reported_not_fatal():
    ext = extension()
    if ext.module is None:
        pytest.skip("qft._C not built")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert ext.device_count == 0 and not ext.usable
    assert ext.device_status, "device_status must say why no GPU is usable"


def test_kernel_launch_without_gpu_raises_runtime_error():
    ext = extension()
    if ext.module is None or ext.device_count:
        pytest.skip("needs the built extension on a machine without a GPU")
    with pytest.raises(RuntimeError, match="qft CUDA kernel failed"):
        # fake non-null addresses: the call passes the extension's checks and fails at the launch
        weight = ext.module.QuantWeight(
            codes=16,
            scales=16,
            zeros=0,
            nested_scales=0,
            offset=0,
            code=16,
            dynamic_map=0,
            bits=4,
            affine=False,
            numel=64,
            block_size=64,
            nested_block_size=256,
        )
        ext.module.dequantize(weight, out=16, out_dtype=0, row_length=64, row_stride=64, stream=0)
