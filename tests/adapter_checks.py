"""Checks every adapter family's tests make the same way: what forward keeps for backward, the merge
round trip, and a trained model's adapter files reloaded into a fresh quantized tiny Llama."""

import torch

import qft


def saved_by(fn) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor autograd keeps while ``fn()`` runs."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return [(tuple(t.shape), t.dtype) for t in saved]


def assert_merge_round_trip(layer, x: torch.Tensor, tol: float) -> None:
    """``layer``'s output is the same unmerged, merged and unmerged again (within ``tol``)."""
    want = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), want, rtol=tol, atol=tol)
    layer.unmerge()
    torch.testing.assert_close(layer(x), want, rtol=tol, atol=tol)


def quantized_tiny_llama(seed: int = 0):
    """The tiny Llama with every linear but the head quantized (nf4)."""
    from llama_models import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config())
    qft.quantize_(model, filter_fn=lambda module, name: name != "lm_head")
    return model


def assert_trains_only_parts_and_files_round_trip(config, parts: tuple[str, ...], path) -> None:
    """``add_adapters(config)`` leaves only ``parts`` trainable; with random values they change the
    logits, and a fresh model loading the saved files gives the same logits exactly."""
    from llama_models import token_ids

    trained = quantized_tiny_llama()
    ids = token_ids()
    before = trained(ids).logits
    qft.add_adapters(trained, config)
    names = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert names and all(any(f".{part}." in n or n.endswith(f".{part}") for part in parts) for n in names), names
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    want = trained(ids).logits
    assert not torch.allclose(want, before)
    qft.save_adapters(trained, path)
    fresh = quantized_tiny_llama()
    qft.load_adapters(fresh, path)
    torch.testing.assert_close(fresh(ids).logits, want, rtol=0, atol=0)


def assert_files_move_between_qft_and_peft(peft_model, ours, targets, path, change, tol: float) -> None:
    """Twin TwoLayer models (PEFT's adapters over dense copies, qft's over the quantized layers, same
    values): PEFT's files load into a fresh qft model with equal outputs; after ``change(ours)`` qft's
    files load into PEFT's model (its adapters taken off first) with outputs equal within ``tol``."""
    from peft import PeftModel
    from peft_models import TwoLayer

    x = torch.randn(4, ours.fc1.in_features)
    peft_model.save_pretrained(path / "from_peft")
    fresh = TwoLayer()
    qft.quantize_(fresh)
    for name in targets:
        getattr(fresh, name).load_state_dict(getattr(ours, name).base_layer.state_dict())
    qft.load_adapters(fresh, path / "from_peft")  # builds the layers from adapter_config.json
    torch.testing.assert_close(fresh(x), ours(x))
    with torch.no_grad():
        change(ours)
    qft.save_adapters(ours, path / "from_qft")
    plain = peft_model.base_model.model
    for name in targets:
        setattr(plain, name, getattr(plain, name).base_layer)
    loaded = PeftModel.from_pretrained(plain, path / "from_qft", is_trainable=True)
    torch.testing.assert_close(loaded(x), ours(x), rtol=tol, atol=tol)


def quantized_and_dense_twins(dtype, targets, seed: int = 0):
    """(a quantized TwoLayer, a dense TwoLayer holding its dequantized weights and biases): the bases of
    the PEFT-exactness tests (PEFT's adapters go on the dense one, qft's on the quantized one)."""
    from peft_models import TwoLayer

    torch.manual_seed(seed)
    ours = TwoLayer(dtype=dtype)
    qft.quantize_(ours)
    dense = TwoLayer(dtype=dtype)
    with torch.no_grad():
        for name in targets:
            getattr(dense, name).weight.copy_(getattr(ours, name).dequantize(dtype))
            getattr(dense, name).bias.copy_(getattr(ours, name).bias)
    return ours, dense


def assert_peft_merge_round_trip(model, ids) -> None:
    """A PEFT model over qft layers: ``merge_adapter`` and ``unmerge_adapter`` (each re-quantizing, with
    its warning) keep the logits nearer the adapted ones than the base model's."""
    import pytest

    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            base_only = model(ids).logits
        with pytest.warns(UserWarning, match="re-quantizes"):
            model.merge_adapter()
        assert (model(ids).logits - adapted).abs().max() < 0.5 * (base_only - adapted).abs().max()
        with pytest.warns(UserWarning, match="re-quantizes"):
            model.unmerge_adapter()
        assert (model(ids).logits - adapted).abs().max() < 0.5 * (base_only - adapted).abs().max()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over max |want|."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def assert_equal_to_peft(peft_model, ours, x: torch.Tensor, parts, tol: float) -> None:
    """Same output (dtype, and values within ``tol`` relative), grad_x and grads of every part
    (``(qft name, PEFT name)`` pairs per target layer) for PEFT's twin and qft's."""
    x_peft, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_peft, y_ours = peft_model(x_peft), ours(x_ours)
    assert y_ours.dtype == y_peft.dtype and relative_error(y_ours, y_peft) <= tol
    grad = torch.randn_like(y_peft)
    y_peft.backward(grad)
    y_ours.backward(grad)
    assert relative_error(x_ours.grad, x_peft.grad) <= tol
    for target, pairs in parts.items():
        layer, theirs = getattr(ours, target), getattr(peft_model.base_model.model, target)
        for mine, peft_name in pairs:
            got, want = getattr(layer, mine).grad, getattr(theirs, peft_name)["default"].grad
            assert relative_error(got, want) <= tol, (target, mine)
