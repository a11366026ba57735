"""qft.integrations.peft_boft: PEFT's BOFT over qft-quantized models (opt-in), equal to qft's BOFT
through PEFT's files, with the butterfly factors asked for."""

import copy

import pytest
import torch
from adapter_checks import assert_peft_merge_round_trip, quantized_tiny_llama
from llama_models import token_ids

import qft

pytest.importorskip("peft")
from peft import BOFTConfig as PeftBOFTConfig
from peft import get_peft_model

from qft.integrations import peft_boft

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    return quantized_tiny_llama()


def _peft_boft(base, **kwargs):
    config = PeftBOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=TARGETS, **kwargs)
    peft_boft.enable_boft()
    try:
        model = get_peft_model(copy.deepcopy(base), config)
    finally:
        peft_boft.disable_boft()
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "boft_R" in name:
                p.normal_(0, 0.2)
            elif "boft_s" in name:
                p.normal_(1, 0.1)
    return model


def test_opt_in_builds_qft_layers_equal_to_qft_boft(base, tmp_path):
    with pytest.raises(TypeError, match="not supported"):  # PEFT alone cannot wrap a QuantLinear
        get_peft_model(copy.deepcopy(base), PeftBOFTConfig(boft_block_size=4, target_modules=TARGETS))
    model = _peft_boft(base)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, peft_boft.QftBOFTLinear)
    assert layer.boft_R["default"].shape[0] == 2  # the factors asked for, with no CUDA extension
    assert layer.boft_P.numel() == 0  # index vectors instead of PEFT's dense permutation matrices
    ids = token_ids()
    want = model(ids).logits
    want.square().mean().backward()
    assert layer.boft_R["default"].grad.abs().sum() > 0 and layer.boft_s["default"].grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "boft")
    config = qft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=tuple(TARGETS))
    ours = qft.add_adapters(copy.deepcopy(base), config)
    qft.load_adapters(ours, tmp_path / "boft")
    torch.testing.assert_close(ours(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_merge_and_unmerge_through_the_quantized_base(base):
    assert_peft_merge_round_trip(_peft_boft(base), token_ids())


def test_two_active_adapters_compose_in_peft_s_order(base):
    model = _peft_boft(base)
    model.add_adapter("second", PeftBOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=TARGETS))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.boft_R["second"].normal_(0, 0.2)
    layer.set_adapter(["default", "second"])
    x = torch.randn(3, layer.in_features)
    rotation, scale = torch.eye(layer.in_features), torch.ones(layer.out_features)
    for name in ("default", "second"):  # PEFT: R = M_second M_default, s = s_second s_default
        m, s = layer.get_delta_weight(name)
        rotation, scale = m @ rotation, s.view(-1) * scale
    w = layer.get_base_layer().dequantize(torch.float32)
    torch.testing.assert_close(layer(x), (x @ rotation @ w.t()) * scale, rtol=1e-5, atol=1e-5)
