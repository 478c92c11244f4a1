"""Whole-model parity with transformers.GptOssForCausalLM: a random HF model saved with `save_pretrained`,
loaded through `gptoss_jax.load_model`, must give the same float32 logits (relative error <= 1e-5)."""

import numpy as np
import pytest
import torch
from flax import nnx

import gptoss_jax

from helpers import relative_error
from hf_models import random_hf_model

TOLERANCE = 1e-5

CASES = {
    # odd layer count (ends on a banded layer), sequence longer than the window, batch 2, 2 kv heads
    "odd_layers": (dict(num_hidden_layers=3), 2, 13),
    # even layer count, one kv head (multi-query), experts that are often left without tokens
    "one_kv_head": (dict(num_hidden_layers=4, num_key_value_heads=1, num_local_experts=7), 2, 11),
    # kv heads = query heads, top-2 routing, a rope whose YaRN ramp bounds need clipping (tiny original context)
    "mha_short_rope": (
        dict(
            num_hidden_layers=2,
            num_key_value_heads=6,
            num_experts_per_tok=2,
            rope_parameters=dict(
                rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=16.0, beta_slow=2.0,
                original_max_position_embeddings=64, truncate=False,
            ),
        ),
        3,
        9,
    ),
    # single layer: no full-attention layers at all
    "one_layer": (dict(num_hidden_layers=1), 1, 7),
    # longer than an attention block (128): the blockwise path, with a partial last block
    "blockwise": (dict(num_hidden_layers=2), 2, 300),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    overrides, batch, length = CASES[case]
    hf = random_hf_model(seed=len(case), **overrides)
    hf.save_pretrained(tmp_path)
    tokens = np.random.default_rng(0).integers(0, hf.config.vocab_size, (batch, length))
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()

    model = gptoss_jax.load_model(tmp_path, dtype="float32")
    actual = nnx.jit(lambda m, t: m(t))(model, tokens.astype(np.int32))
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= TOLERANCE


def test_sharded_checkpoint_loads_the_same(tmp_path):
    hf = random_hf_model(seed=3, num_hidden_layers=4)
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    tokens = np.random.default_rng(1).integers(0, 300, (2, 10)).astype(np.int32)
    one = gptoss_jax.load_model(tmp_path / "one", dtype="float32")(tokens)
    sharded = gptoss_jax.load_model(tmp_path / "sharded", dtype="float32")(tokens)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(sharded))


def test_left_padding_with_segment_ids_matches_attention_mask(tmp_path):
    """Padding expressed as segment ids + positions equals HF's attention_mask + position_ids on real tokens."""
    hf = random_hf_model(seed=5, num_hidden_layers=3)
    hf.save_pretrained(tmp_path)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 300, (2, 12))
    real = np.ones((2, 12), np.int64)
    real[1, :4] = 0  # the second prompt is 4 tokens shorter, padded on the left
    positions = np.maximum(np.cumsum(real, axis=1) - 1, 0)
    with torch.no_grad():
        expected = hf(
            torch.tensor(tokens), attention_mask=torch.tensor(real), position_ids=torch.tensor(positions)
        ).logits.numpy()

    model = gptoss_jax.load_model(tmp_path, dtype="float32")
    actual = np.asarray(model(tokens.astype(np.int32), positions=positions, segment_ids=real))
    keep = real.astype(bool)
    assert relative_error(actual[keep], expected[keep]) <= TOLERANCE


def test_bfloat16_model_tracks_float32(tmp_path):
    """The bf16 dtype policy (bf16 params and activations, f32 norms/softmax/router) stays close to f32."""
    hf = random_hf_model(seed=7, num_hidden_layers=2)
    hf.save_pretrained(tmp_path)
    tokens = np.random.default_rng(3).integers(0, 300, (2, 9)).astype(np.int32)
    reference = np.asarray(gptoss_jax.load_model(tmp_path, dtype="float32")(tokens))
    model = gptoss_jax.load_model(tmp_path)
    assert model.embedding.dtype == np.dtype("bfloat16")
    assert model.norm.scale.dtype == np.float32 and model.banded_blocks.attn.sinks.dtype == np.float32
    logits = model(tokens)
    assert logits.dtype == np.dtype("bfloat16")
    assert relative_error(logits, reference) <= 3e-2
