"""QLoRA, QOFT and the other adapter families under FSDP2: 2 CPU ranks (gloo, torchrun) against the
same run unsharded, through the example benchmarks/fsdp_qlora.py; and the flat storage FSDP2 shards."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qft

SCRIPT = str(Path(__file__).resolve().parents[2] / "benchmarks" / "fsdp_qlora.py")
# int2:lora:8 with PagedAdamW 8-bit state; one case for each other adapter family
CASES = ["nf4:lora", "int3:lora", "nf4:oft", "int2:lora:8", "nf4:boft", "nf4:diablo", "nf4:ether", "nf4:hra"]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _run(launcher, script_args, out):
    command = [sys.executable, *launcher, SCRIPT, "--cases", ",".join(CASES), "--out", str(out), *script_args]
    done = subprocess.run(command, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]  # also: no abort at process-group teardown
    return json.loads(out.read_text()), torch.load(out.with_suffix(".pt"))


def test_two_ranks_train_like_one_process_and_checkpoint(tmp_path):
    single, single_adapters = _run([], ["--no-shard"], tmp_path / "single.json")
    sharded, sharded_adapters = _run(TORCHRUN, ["--checkpoint-dir", "auto"], tmp_path / "sharded.json")
    for case in CASES:
        one, two = single[case], sharded[case]
        eight_bit = case.endswith(":8")
        # Same losses but for fp32 reduction order (8-bit state: a moment may round to the next code).
        torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
        assert two["losses"][-1] < two["losses"][0]
        tol = 2e-3 if eight_bit else 1e-4
        for name, want in single_adapters[case].items():
            got = sharded_adapters[case][name]
            assert (got - want).abs().max() <= tol * want.abs().max(), (case, name)
        # Each rank holds half of the quantized weights (16-byte alignment of the flat parts aside).
        per_rank, total = two["quantized_bytes_per_rank"], two["quantized_bytes_total"]
        assert per_rank[0] == per_rank[1] == total // 2
        assert one["quantized_bytes_total"] <= total <= 1.02 * one["quantized_bytes_total"]
        assert two["checkpoint_resumes"], f"{case}: the reloaded sharded checkpoint took a different step"


def test_flat_storage_keeps_outputs_and_moves_the_state_dict():
    torch.manual_seed(0)
    layer = qft.nn.QuantLinear.from_linear(torch.nn.Linear(64, 48), qft.QuantConfig("int3"))
    x = torch.randn(3, 64)
    want = layer(x)
    before = layer.quantized.nbytes
    qft.nn.prepare_fsdp(torch.nn.Sequential(layer))
    assert torch.equal(layer(x), want)
    assert sorted(layer.state_dict()) == ["bias", "weight_storage"]
    assert layer.double_quant and "double_quant" in repr(layer)
    assert layer.weight_storage.dtype == torch.uint8 and not layer.weight_storage.requires_grad
    local, total = qft.nn.quantized_bytes(torch.nn.Sequential(layer))
    assert local == total == layer.weight_storage.numel() and before <= total < before + 16 * 5
    twin = qft.nn.QuantLinear.from_linear(torch.nn.Linear(64, 48), qft.QuantConfig("int3")).to_flat_storage()
    twin.load_state_dict(layer.state_dict())
    assert torch.equal(twin(x), want)
    layer.set_weight(layer.dequantize(torch.float32) * 2)  # a merge re-quantizes into new flat storage
    torch.testing.assert_close(layer(x) - layer.bias, 2 * (want - layer.bias), rtol=0.1, atol=0.05)


def test_shard_model_makes_peft_adapter_layers_units(tmp_path):
    import copy

    import torch.distributed as dist
    from llama_models import tiny_llama_config, token_ids
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import FSDPModule
    from transformers import LlamaForCausalLM

    from qft.integrations.peft import register

    torch.manual_seed(0)
    model = qft.quantize_(LlamaForCausalLM(tiny_llama_config()), filter_fn=lambda module, name: name != "lm_head")
    model = get_peft_model(model, register(LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
    plain = copy.deepcopy(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        qft.nn.shard_model(model)
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        # 4 PEFT LoRA layers (q, v in 2 layers), 10 bare quantized linears, and the root.
        assert len(units) == 15
        assert sum(isinstance(m, qft.integrations.peft.QftLoraLinear) for m in units) == 4
        ids = token_ids()
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_integer_parameters_are_created_frozen_while_sharding():
    from qft.nn.fsdp import frozen_integer_parameters

    codes = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="floating point"):
        torch.nn.Parameter(codes)  # what torch < the fix did inside fully_shard
    with frozen_integer_parameters():
        frozen = torch.nn.Parameter(codes)
        trained = torch.nn.Parameter(torch.zeros(3))
    assert type(frozen) is torch.nn.Parameter and not frozen.requires_grad
    assert trained.requires_grad  # floating parameters keep the default
    with pytest.raises(RuntimeError, match="floating point"):
        torch.nn.Parameter(codes)  # restored on exit
