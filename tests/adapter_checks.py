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
