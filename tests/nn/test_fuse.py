"""``qft.nn.fuse_projections``: LoRA layers that read the same x run as one, with the model's outputs,
gradients, state dict and adapter files unchanged."""

import copy

import pytest
import torch
from llama_models import tiny_llama_config, token_ids

import qft
from qft import ops
from qft.nn import fuse_projections, unfuse_projections

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _model(dropout=0.0, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).to(dtype)
    qft.quantize_(model, filter_fn=lambda module, name: name != "lm_head")
    qft.add_adapters(model, qft.LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules=TARGETS))
    with torch.no_grad():  # B away from zero so the adapters count
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(0, 0.05)
    return model


def _step(model, ids, seed=3):
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks, drawn in the same order
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_groups_every_attention_and_mlp_input_and_nothing_else():
    model = _model()
    groups = fuse_projections(model)
    assert len(groups) == 2 * 2  # two layers: q/k/v and gate/up each
    named = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    assert sorted(tuple(named[id(m)] for m in g.members) for g in groups) == sorted(
        [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")] * 2
    )
    assert fuse_projections(model) == []  # grouped layers are not grouped twice
    assert unfuse_projections(model) == 10


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_reference_backend_outputs_and_grads_match_the_layers_alone(dropout):
    # The same ops per member; only the sum of the members' grad_x comes in another order.
    model, ids = _model(dropout), token_ids(length=12)
    model.train()
    want = _step(model, ids)
    keys = list(model.state_dict())
    fuse_projections(model)
    got = _step(model, ids)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_gpu_backend_path_shares_one_gemm_and_matches_the_layers_alone(monkeypatch):
    # batch 3 x 16 tokens = 48 rows: above the fused small-M kernel, so the stacked GEMMs run.
    from qft.ops import stack

    calls = []
    real = stack.stack_forward
    monkeypatch.setattr(stack, "stack_forward", lambda *a: calls.append(len(a[1])) or real(*a))
    model, ids = _model(), token_ids(batch=3, length=16)
    with ops.use_backend("triton"):
        want = _step(model, ids)
        fuse_projections(model)
        got = _step(model, ids)
    assert sorted(calls) == [2, 2, 3, 3]  # gate/up and q/k/v of each layer, one GEMM each
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_adapter_files_are_the_same(tmp_path):
    model = _model()
    qft.save_adapters(model, tmp_path / "before")
    fuse_projections(model)
    qft.save_adapters(model, tmp_path / "after")
    before = sorted(p.name for p in (tmp_path / "before").iterdir())
    assert before == sorted(p.name for p in (tmp_path / "after").iterdir())
    for name in before:
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes(), name


def test_members_called_with_other_inputs_or_merged_run_alone():
    model = _model().eval()
    attention = model.model.layers[0].self_attn
    x, other = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    want = [attention.q_proj(x), attention.k_proj(other), attention.v_proj(x)]
    fuse_projections(model)
    got = [attention.q_proj(x), attention.k_proj(other), attention.v_proj(x)]  # k sees another x
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    x.add_(1.0)  # changed in place after q: k and v must not reuse the pass made for the old values
    fresh = copy.deepcopy(attention)
    unfuse_projections(fresh)
    attention.q_proj(other)
    torch.testing.assert_close(attention.k_proj(x), fresh.k_proj(x), rtol=0, atol=0)
    attention.k_proj.merge()  # a merged member: every member runs alone
    torch.testing.assert_close(attention.k_proj(x), attention.k_proj.base_layer(x), rtol=0, atol=0)
    torch.testing.assert_close(attention.q_proj(x), fresh.q_proj(x), rtol=0, atol=0)


def test_layers_that_cannot_share_are_left_alone():
    model = _model()
    layer = model.model.layers[0]
    layer.self_attn.k_proj.merge()  # a merged member: that set stays ungrouped
    assert len(fuse_projections(model)) == 3
    assert "projection_group" not in layer.self_attn.q_proj.__dict__
    unfuse_projections(model)
    qft.nn.prepare_fsdp(model)  # each layer its own FSDP unit: siblings may be sharded mid-forward
    assert fuse_projections(model) == []


@pytest.mark.gpu
def test_gpu_fused_projections_match_the_layers_alone():
    model, ids = _model(dtype=torch.bfloat16).cuda(), token_ids(batch=4, length=32).cuda()
    want = _step(model, ids)
    fuse_projections(model)
    got = _step(model, ids)
    torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=2e-2)
    for name in want[1]:  # bf16: the stacked GEMM sums in another order than the layers' own
        scale = want[1][name].abs().max().item()
        assert (got[1][name] - want[1][name]).abs().max().item() <= 2**-5 * scale, name
