"""Tiny checkpoints in the three released layouts, holding the same weights, written independently of gptoss_jax
(names, shapes and packing straight from DESIGN.md §2; MXFP4 values from transformers' own dequantizer).

The experts start as random MXFP4 bytes; the dense copy transformers holds is their exact dequantization, so the
unquantized, HF-MXFP4 and original checkpoints all describe one model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from hf_models import random_hf_model

# Sizes that MXFP4 can hold (multiples of 32) and that tell inputs from outputs apart (128, 2 * 96, 96).
MXFP4_SIZES = dict(hidden_size=128, intermediate_size=96, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                   num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=3, sliding_window=4)


def random_mxfp4(rng, experts: int, outputs: int, inputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks [E, out, in/32, 16] and scales [E, out, in/32] whose values are of order 0.1."""
    blocks = torch.tensor(rng.integers(0, 256, (experts, outputs, inputs // 32, 16), dtype=np.uint8))
    scales = torch.tensor(rng.integers(119, 123, (experts, outputs, inputs // 32), dtype=np.uint8))
    return blocks, scales


def model_with_mxfp4_experts(seed: int = 0, **overrides):
    """A random HF model whose experts are exactly representable in MXFP4, and its packed expert bytes by layer."""
    model = random_hf_model(seed=seed, **{**MXFP4_SIZES, **overrides})
    config = model.config
    rng = np.random.default_rng(seed)
    packed = []
    with torch.no_grad():
        for layer in model.model.layers:
            gate_up = random_mxfp4(rng, config.num_local_experts, 2 * config.intermediate_size, config.hidden_size)
            down = random_mxfp4(rng, config.num_local_experts, config.hidden_size, config.intermediate_size)
            layer.mlp.experts.gate_up_proj.copy_(convert_moe_packed_tensors(*gate_up, dtype=torch.float32))
            layer.mlp.experts.down_proj.copy_(convert_moe_packed_tensors(*down, dtype=torch.float32))
            packed.append((gate_up, down))
    return model, packed


def write_hf_mxfp4(model, packed, directory: Path) -> Path:
    """The layout of openai/gpt-oss-*: experts as *_blocks / *_scales, everything else as in save_pretrained."""
    directory.mkdir(parents=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            layer = int(name.split(".")[2])
            blocks, scales = packed[layer][0 if name.endswith("gate_up_proj") else 1]
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        else:
            tensors[name] = tensor.contiguous()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads(model.config.to_json_string())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def write_original(model, packed, directory: Path) -> Path:
    """`original/`: config.json with the 16 ModelConfig keys and one model.safetensors, per DESIGN.md §2."""
    config: transformers.GptOssConfig = model.config
    original = directory / "original"
    original.mkdir(parents=True)
    rope = config.rope_parameters
    (original / "config.json").write_text(json.dumps({
        "num_hidden_layers": config.num_hidden_layers, "num_experts": config.num_local_experts,
        "experts_per_token": config.num_experts_per_tok, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "swiglu_limit": config.swiglu_limit, "head_dim": config.head_dim,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "sliding_window": config.sliding_window, "initial_context_length": rope["original_max_position_embeddings"],
        "rope_theta": rope["rope_theta"], "rope_scaling_factor": rope["factor"],
        "rope_ntk_alpha": rope["beta_slow"], "rope_ntk_beta": rope["beta_fast"],
    }))
    hf = model.state_dict()
    tensors = {
        "embedding.weight": hf["model.embed_tokens.weight"],
        "unembedding.weight": hf["lm_head.weight"],
        "norm.scale": hf["model.norm.weight"],
    }
    for i in range(config.num_hidden_layers):
        layer, block = f"model.layers.{i}.", f"block.{i}."
        attn = layer + "self_attn."
        (gate_up_blocks, gate_up_scales), (down_blocks, down_scales) = packed[i]
        tensors |= {
            block + "attn.norm.scale": hf[layer + "input_layernorm.weight"],
            # fused rows: q, then k, then v
            block + "attn.qkv.weight": torch.cat([hf[attn + f"{p}_proj.weight"] for p in "qkv"]),
            block + "attn.qkv.bias": torch.cat([hf[attn + f"{p}_proj.bias"] for p in "qkv"]),
            block + "attn.sinks": hf[attn + "sinks"],
            block + "attn.out.weight": hf[attn + "o_proj.weight"],
            block + "attn.out.bias": hf[attn + "o_proj.bias"],
            block + "mlp.norm.scale": hf[layer + "post_attention_layernorm.weight"],
            block + "mlp.gate.weight": hf[layer + "mlp.router.weight"],
            block + "mlp.gate.bias": hf[layer + "mlp.router.bias"],
            block + "mlp.mlp1_weight.blocks": gate_up_blocks,
            block + "mlp.mlp1_weight.scales": gate_up_scales,
            block + "mlp.mlp1_bias": hf[layer + "mlp.experts.gate_up_proj_bias"],
            block + "mlp.mlp2_weight.blocks": down_blocks,
            block + "mlp.mlp2_weight.scales": down_scales,
            block + "mlp.mlp2_bias": hf[layer + "mlp.experts.down_proj_bias"],
        }
    save_file({k: v.contiguous() for k, v in tensors.items()}, original / "model.safetensors")
    return directory
