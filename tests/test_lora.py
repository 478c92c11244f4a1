"""LoRA adapters: equal to PEFT on transformers, merged equal to adapted, PEFT directories round-trip."""

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
from flax import nnx
from peft import PeftModel

import gptoss_jax
from gptoss_jax import CheckpointError
from gptoss_jax.lora import LoraConfig, add_lora, load_peft_adapter, merge_lora, save_peft_adapter
from gptoss_jax.model import LoRAParam

from helpers import relative_error
from hf_models import random_hf_model
from layouts import model_with_mxfp4_experts, write_hf_mxfp4

TOLERANCE = 1e-5


def _adapted(model, targets, seed=3):
    """Adapters with random, non-zero a and b (b starts at zero, which would hide errors)."""
    add_lora(model, LoraConfig(rank=4, alpha=8, targets=targets), rngs=nnx.Rngs(seed))
    state = nnx.state(model, LoRAParam)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape), state))
    return model


@pytest.mark.parametrize("targets", [("*",), ("q_proj", "o_proj"), ("router",), ("gate_up_proj",), ("*_proj",)])
def test_adapters_match_peft_on_transformers(tmp_path, targets):
    random_hf_model(seed=1, num_hidden_layers=3).save_pretrained(tmp_path / "base")
    model = _adapted(gptoss_jax.load_model(tmp_path / "base", dtype="float32"), targets)
    save_peft_adapter(model, tmp_path / "adapter")
    tokens = np.random.default_rng(0).integers(0, 300, (2, 11))
    peft_model = PeftModel.from_pretrained(random_hf_model(seed=1, num_hidden_layers=3), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = peft_model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(model(tokens.astype(np.int32)))
    base = np.asarray(gptoss_jax.load_model(tmp_path / "base", dtype="float32")(tokens.astype(np.int32)))
    assert relative_error(base, expected) > 1e-3  # the adapters change the output
    assert relative_error(ours, expected) <= TOLERANCE

    again = load_peft_adapter(gptoss_jax.load_model(tmp_path / "base", dtype="float32"), tmp_path / "adapter")
    np.testing.assert_array_equal(np.asarray(again(tokens.astype(np.int32))), ours)


def test_merged_model_equals_the_adapted_one_on_a_packed_base(tmp_path):
    model, packed = model_with_mxfp4_experts(seed=2)
    write_hf_mxfp4(model, packed, tmp_path / "base")
    adapted = _adapted(gptoss_jax.load_model(tmp_path / "base", dtype="float32"), ("*",))
    merged = merge_lora(adapted)
    assert not nnx.state(merged, LoRAParam)
    tokens = np.random.default_rng(1).integers(0, 300, (2, 9)).astype(np.int32)
    assert relative_error(merged(tokens), adapted(tokens)) <= TOLERANCE
    attention_only = merge_lora(_adapted(gptoss_jax.load_model(tmp_path / "base", dtype="float32"), ("q_proj",)))
    assert attention_only.banded_blocks.mlp.w_gate_up.get_value().blocks.dtype == np.uint8  # experts stay packed


@pytest.mark.parametrize("num_tokens", [1, 13])  # gathered experts (decoding) and ragged groups
def test_grouped_expert_adapters_equal_merged_weights(tmp_path, num_tokens, expert_path):
    random_hf_model(seed=4, num_hidden_layers=1).save_pretrained(tmp_path / "base")
    model = _adapted(gptoss_jax.load_model(tmp_path / "base", dtype="float32"), ("gate_up_proj", "down_proj"))
    graphdef, stacked = nnx.split(model.banded_blocks.mlp)
    moe = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked))  # the first layer
    x = np.random.default_rng(2).normal(size=(num_tokens, 48)).astype(np.float32)
    weights, experts, _ = moe.route(x)
    grouped, looped = moe.grouped_experts(x, weights, experts), moe.loop_over_experts(x, weights, experts)
    assert relative_error(grouped, looped) <= TOLERANCE


def test_bad_lora_configs():
    with pytest.raises(ValueError, match="'attn' matches none of"):
        LoraConfig(targets=("attn",)).names()
    with pytest.raises(ValueError, match="dropout: must be 0 when the router or experts are targeted"):
        LoraConfig(dropout=0.1, targets=("*",)).names()
    assert LoraConfig(dropout=0.1).names() == ["q_proj", "k_proj", "v_proj", "o_proj"]


def _peft_written(tmp_path, **settings):
    """An adapter that PEFT itself trains-initialises (random non-zero B) and saves, on a random base."""
    random_hf_model(seed=1, num_hidden_layers=2).save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             **settings)
    peft_model = peft.get_peft_model(random_hf_model(seed=1, num_hidden_layers=2), config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model


@pytest.mark.parametrize("settings", [{}, {"use_rslora": True}])
def test_adapters_written_by_peft_load_to_peft_logits(tmp_path, settings):
    peft_model = _peft_written(tmp_path, **settings)
    tokens = np.random.default_rng(0).integers(0, 300, (2, 9))
    with torch.no_grad():
        expected = peft_model(torch.tensor(tokens)).logits.numpy()
    model = load_peft_adapter(gptoss_jax.load_model(tmp_path / "base", dtype="float32"), tmp_path / "adapter")
    assert relative_error(np.asarray(model(tokens.astype(np.int32))), expected) <= TOLERANCE


@pytest.mark.parametrize("settings, field", [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"alpha_pattern": {"v_proj": 32}}, "alpha_pattern"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ({"bias": "lora_only"}, "bias"),
    ({"bias": "all"}, "bias"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"use_dora": True}, "use_dora"),
])
def test_peft_fields_we_do_not_honour_are_refused(tmp_path, settings, field):
    _peft_written(tmp_path, **settings)
    with pytest.raises(CheckpointError, match=rf"adapter_config\.json: {field}=.* is not supported"):
        load_peft_adapter(gptoss_jax.load_model(tmp_path / "base", dtype="float32"), tmp_path / "adapter")


def test_adapter_tensors_nothing_reads_are_refused(tmp_path):
    _peft_written(tmp_path)
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(file)
    tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = np.ones((4, 48), np.float32)
    safetensors.numpy.save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: tensor 'base_model\.model\.model\.layers"
                                              r"\.0\.self_attn\.k_proj\.lora_A\.weight' \(and 0 more\) is not a LoRA"):
        load_peft_adapter(gptoss_jax.load_model(tmp_path / "base", dtype="float32"), tmp_path / "adapter")
