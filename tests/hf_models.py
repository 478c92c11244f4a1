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


def bigram_hf_model(chain: list[int], **overrides) -> transformers.GptOssForCausalLM:
    """A real gpt-oss checkpoint whose greedy continuation is known: its layers add nothing to the residual stream
    (zero attention and expert outputs), so the logits depend on the current token alone, and after `chain[i]` the
    largest is `chain[i + 1]`. For testing what is done with a given generation (e.g. a tool call the server must
    report). The chain's tokens, the last aside, must differ from each other."""
    if len(set(chain[:-1])) != len(chain) - 1:
        raise ValueError("a bigram chain cannot revisit a token")
    model = random_hf_model(seed=0, vocab_size=201088, **overrides)
    width = model.config.hidden_size
    if len(chain) > width:
        raise ValueError(f"a chain of {len(chain)} tokens needs hidden_size >= {len(chain)}")
    with torch.no_grad():
        for layer in model.model.layers:
            for param in (layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias, layer.mlp.experts.down_proj,
                          layer.mlp.experts.down_proj_bias):
                param.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for step, (token, following) in enumerate(zip(chain[:-1], chain[1:], strict=True)):
            model.model.embed_tokens.weight[token] = torch.nn.functional.one_hot(torch.tensor(step), width)
            model.lm_head.weight[following, step] = 10.0
    return model


def hf_and_ours(directory, seed: int, **overrides):
    """A random transformers model saved to `directory`, and ours loaded from that checkpoint in float32."""
    import gptoss_jax

    hf = random_hf_model(seed=seed, **overrides)
    hf.save_pretrained(directory)
    return hf, gptoss_jax.load_model(directory, dtype="float32")
