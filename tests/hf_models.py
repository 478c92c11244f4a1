"""Random transformers `GptOssForCausalLM` models: the parity oracle for our model and loader."""

from __future__ import annotations

import torch
import transformers

SMALL = dict(
    num_hidden_layers=3,
    num_local_experts=6,
    num_experts_per_tok=4,
    vocab_size=300,
    hidden_size=48,
    intermediate_size=40,
    head_dim=12,
    num_attention_heads=6,
    num_key_value_heads=2,
    sliding_window=5,
)


def hf_config(**overrides) -> transformers.GptOssConfig:
    """A tiny HF config, with the eager (reference) attention and experts implementations."""
    return transformers.GptOssConfig(
        **{**SMALL, **overrides}, attn_implementation="eager", experts_implementation="eager"
    )


def random_hf_model(seed: int = 0, **overrides) -> transformers.GptOssForCausalLM:
    """Every parameter random and non-zero (HF initialises biases and sinks to zero or near it), scaled so
    activations stay O(1) through the layers and routing has clear winners."""
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif name.endswith(("bias", "sinks")):
                param.copy_(0.5 * torch.randn_like(param))
            else:
                fan_in = param.shape[-2] if "experts" in name else param.shape[-1]
                param.copy_(torch.randn_like(param) / fan_in**0.5)
    return model
