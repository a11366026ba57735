"""A tiny Llama built from a config (random init, no download), saved once per test session."""

import torch

VOCAB = 128


def tiny_llama_config():
    from transformers import LlamaConfig

    # Widths of 64/128 keep bitsandbytes' CPU kernels on their well-trodden paths (see test_bnb_compat).
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def save_tiny_llama(path) -> str:
    """A float32 tiny Llama saved at ``path`` (returns the folder as a string)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    return str(path)


def token_ids(batch=2, length=10, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
