"""qft.integrations.peft: PEFT's get_peft_model over qft-quantized models (LoRA hook, OFT opt-in)."""

import copy

import pytest
import torch
from adapter_checks import assert_peft_merge_round_trip
from llama_models import tiny_llama_config, token_ids

import qft

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model
from peft import OFTConfig as PeftOFTConfig

from qft.integrations import peft as qft_peft

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    return qft.quantize_(model, filter_fn=lambda module, name: name != "lm_head")


def _peft_lora(base):
    model = get_peft_model(
        copy.deepcopy(base), qft_peft.register(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    )
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _qft_lora(base):
    model = copy.deepcopy(base)
    return qft.add_adapters(model, qft.LoRAConfig(r=4, alpha=8, target_modules=tuple(TARGETS)))


def test_get_peft_model_builds_qft_lora_layers_that_compute_plain_lora(base):
    model = _peft_lora(base)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, qft_peft.QftLoraLinear)
    x = torch.randn(3, 64)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = layer.get_base_layer()(x) + layer.scaling["default"] * (x @ a.t()) @ b.t()
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_adapters_move_between_peft_and_qft_both_ways(base, tmp_path):
    peft_model = _peft_lora(base)
    ids = token_ids()
    want = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "peft")
    # PEFT's file -> qft's own layers.
    ours = qft.load_adapters(_qft_lora(base), tmp_path / "peft")
    torch.testing.assert_close(ours(ids).logits, want, rtol=1e-5, atol=1e-5)
    # PEFT's file -> PEFT again (the saved config does not carry the hook: register it on load).
    config = qft_peft.register(LoraConfig.from_pretrained(tmp_path / "peft"))
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", config=config, is_trainable=True)
    torch.testing.assert_close(again(ids).logits, want, rtol=1e-5, atol=1e-5)
    # qft's file -> PEFT.
    qft.save_adapters(ours, tmp_path / "qft")
    config = qft_peft.register(LoraConfig.from_pretrained(tmp_path / "qft"))
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "qft", config=config)
    torch.testing.assert_close(back(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_fused_gradients_equal_qft_lora_layers(base, tmp_path):
    peft_model = _peft_lora(base)
    peft_model.save_pretrained(tmp_path / "a")
    ours = qft.load_adapters(_qft_lora(base), tmp_path / "a")
    ids = token_ids()
    peft_model(ids).logits.square().mean().backward()
    ours(ids).logits.square().mean().backward()
    theirs = {
        n.replace("base_model.model.", "").replace(".default", ""): p.grad
        for n, p in peft_model.named_parameters()
        if p.requires_grad
    }
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert theirs.keys() == mine.keys()
    for name in mine:
        torch.testing.assert_close(theirs[name], mine[name], rtol=1e-4, atol=1e-6)


def test_merge_and_unmerge_through_peft(base):
    model = _peft_lora(base)
    plain = model.get_base_model()
    assert_peft_merge_round_trip(model, token_ids())
    assert plain is model.get_base_model()


def test_oft_opt_in_builds_fused_layers_equal_to_qft_oft(base, tmp_path):
    with pytest.raises(TypeError, match="not supported"):
        get_peft_model(copy.deepcopy(base), PeftOFTConfig(r=0, oft_block_size=16, target_modules=TARGETS))
    qft_peft.enable_oft()
    try:
        model = get_peft_model(copy.deepcopy(base), PeftOFTConfig(r=0, oft_block_size=16, target_modules=TARGETS))
    finally:
        qft_peft.disable_oft()
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, qft_peft.QftOFTLinear)
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if "oft_R" in name:
            torch.nn.init.normal_(p, std=0.05)
    ids = token_ids()
    want = model(ids).logits
    model.save_pretrained(tmp_path / "oft")
    ours = qft.add_adapters(copy.deepcopy(base), qft.OFTConfig(block_size=16, target_modules=tuple(TARGETS)))
    qft.load_adapters(ours, tmp_path / "oft")
    torch.testing.assert_close(ours(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_register_refuses_what_it_cannot_fuse(base):
    with pytest.raises(TypeError, match=r"peft\.LoraConfig"):
        qft_peft.register(PeftOFTConfig(r=0, oft_block_size=16, target_modules=TARGETS))
    config = qft_peft.register(LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    with pytest.raises(ValueError, match="plain LoRA only"):
        get_peft_model(copy.deepcopy(base), config)


def test_compiled_peft_model_over_qft_layers_matches_eager(base):
    model = _peft_lora(base)
    ids = token_ids()
    eager = model(ids).logits
    eager.square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    torch._dynamo.reset()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.compile(layer, backend="aot_eager", fullgraph=True)(torch.randn(2, 64))  # the qft layer as one graph
    compiled = torch.compile(model, backend="aot_eager")  # inductor: test_functional (whole Llama: slow here)
    got = compiled(input_ids=ids).logits
    got.square().mean().backward()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6)
