"""qft as a transformers quantization backend (quant_method "qft"), on a tiny Llama on CPU."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from llama_models import save_tiny_llama, token_ids

import qft
from qft.nn import QuantLinear

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from qft.integrations.transformers import QftConfig, from_bnb_pretrained  # noqa: E402


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "float")


def _logits(model):
    with torch.no_grad():
        return model(token_ids()).logits


@pytest.mark.parametrize("fmt", ["nf4", "int3"])
def test_from_pretrained_with_qftconfig_equals_quantize_(float_dir, fmt):
    model = AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=QftConfig(format=fmt), dtype=torch.float32
    )
    layers = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14 and "lm_head" not in layers, "every linear but the output head"
    assert model.config.quantization_config.format == fmt
    reference = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    qft.quantize_(reference, qft.QuantConfig(fmt), filter_fn=lambda module, name: name != "lm_head")
    assert torch.equal(_logits(model), _logits(reference))
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.rpartition(".")[0] in layers)


def test_save_pretrained_round_trips_bit_exactly_without_a_config(float_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=QftConfig(double_quant=True), dtype=torch.float32
    )
    model.save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == "qft"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys()
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)
    assert torch.equal(_logits(model), _logits(loaded))
    # A pre-quantized model saves again (the deserialize step has a reverse): the same files, twice.
    loaded.save_pretrained(tmp_path / "again")
    from safetensors.torch import load_file

    first, second = load_file(tmp_path / "q" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again")), _logits(model))


def test_bitsandbytes_checkpoint_loads_into_qft_layers_byte_for_byte(float_dir, tmp_path):
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    bnb_model = AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=config, dtype=torch.float32, device_map="cpu"
    )
    bnb_model.save_pretrained(tmp_path / "bnb")
    ours = from_bnb_pretrained(AutoModelForCausalLM, tmp_path / "bnb", dtype=torch.float32)
    theirs, mine = bnb_model.model.layers[1].mlp.down_proj, ours.model.layers[1].mlp.down_proj
    assert isinstance(mine, QuantLinear) and mine.format == "nf4" and mine.weight_nested_scales is not None
    assert torch.equal(theirs.weight.data.view(-1), mine.weight_codes)
    # bitsandbytes' eval-mode CPU kernel computes in bf16; its training path dequantizes and matmuls in fp32.
    bnb_model.train()
    assert torch.equal(_logits(ours), _logits(bnb_model))
    # bitsandbytes' compute dtype (float32 here) does not override the dtype the caller asks for.
    assert from_bnb_pretrained(AutoModelForCausalLM, tmp_path / "bnb", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_checkpoint_keys_map_to_their_layer_even_when_names_contain_weight():
    from qft.integrations.transformers import _entry_of, _layer_of

    model = torch.nn.Module()
    model.weight_proj = torch.nn.Linear(4, 4)
    assert _entry_of("weight_proj.weight.nested_absmax") == "weight.nested_absmax"
    assert _layer_of(model, "weight_proj.weight.absmax") == ("weight_proj", model.weight_proj)
    assert _layer_of(model, "weight_proj.weight") == ("weight_proj", model.weight_proj)
    assert _entry_of("weight_proj.bias") is None


def test_bad_config_and_mismatched_checkpoint_fail_at_load(float_dir, tmp_path, capfd, caplog):
    with pytest.raises(ValueError, match="format must be one of"):
        QftConfig(format="nf5")
    with pytest.raises(TypeError, match="unknown arguments"):
        QftConfig(bits=4)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=QftConfig(), dtype=torch.float32)
    model.save_pretrained(tmp_path / "q")
    shutil.copytree(tmp_path / "q", tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    config["quantization_config"]["format"] = "int4"
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    capfd.readouterr()
    with pytest.raises(RuntimeError, match="conversion"):  # transformers' own error, after its load report
        AutoModelForCausalLM.from_pretrained(tmp_path / "bad")
    # The report names the layer and qft's reason.
    report = "".join(capfd.readouterr()) + caplog.text
    assert "self_attn.q_proj" in report and "stored as nf4 with block size 64, but the config says int4" in report
    with pytest.raises(ValueError, match="not a bitsandbytes 4-bit checkpoint"):
        from_bnb_pretrained(AutoModelForCausalLM, tmp_path / "q")


def test_import_qft_registers_the_quantizer_when_transformers_loads():
    code = (
        "import sys, qft; assert 'transformers' not in sys.modules; "
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING; "
        "assert AUTO_QUANTIZER_MAPPING['qft'].__name__ == 'QftHfQuantizer'; "
        "assert AUTO_QUANTIZATION_CONFIG_MAPPING['qft'] is qft.QftConfig"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"TRITON_INTERPRET": "1", "PATH": ""})


def test_compute_dtype_sets_the_models_dtype(float_dir):
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=QftConfig(compute_dtype="bfloat16"))
    layer = model.model.layers[0].self_attn.q_proj
    assert model.dtype == torch.bfloat16 and layer.weight_dtype == torch.bfloat16
    assert _logits(model).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="compute_dtype"):
        QftConfig(compute_dtype=torch.int8)


def test_gpt2_conv1d_layers_are_quantized_in_linear_orientation(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32)).save_pretrained(
        tmp_path / "gpt2"
    )
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "gpt2", quantization_config=QftConfig(), dtype=torch.float32
    )
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", dtype=torch.float32)
    convs = {n: m for n, m in reference.named_modules() if isinstance(m, Conv1D)}
    assert len(convs) == 8
    for name, conv in convs.items():  # Conv1D computes x @ W + b with W [in, out]
        layer = QuantLinear(qft.quantize(conv.weight.detach().t(), "nf4", 64, True), conv.bias.detach())
        parent, _, leaf = name.rpartition(".")
        setattr(reference.get_submodule(parent), leaf, layer)
    assert torch.equal(_logits(model), _logits(reference))
    model.save_pretrained(tmp_path / "q")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q")), _logits(model))


def test_keep_in_fp32_modules_stay_fp32_through_a_pre_quantized_reload(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=128, d_model=64, d_ff=128, d_kv=16, num_layers=1, num_heads=4, decoder_start_token_id=0
    )
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    model = T5ForConditionalGeneration
    first = model.from_pretrained(tmp_path / "t5", quantization_config=QftConfig(), dtype=torch.float16)
    wo = first.encoder.block[0].layer[1].DenseReluDense.wo
    assert type(wo) is torch.nn.Linear and wo.weight.dtype == torch.float32  # T5 keeps wo in fp32 under fp16
    first.save_pretrained(tmp_path / "q")
    again = model.from_pretrained(tmp_path / "q", dtype=torch.float16)
    assert again.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert again.encoder.block[0].layer[0].SelfAttention.q.weight_dtype == torch.float16
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(
            again(input_ids=ids, decoder_input_ids=ids).logits, first(input_ids=ids, decoder_input_ids=ids).logits
        )
