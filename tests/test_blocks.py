"""Block-level checks against transformers' gpt-oss modules and against direct float64 loops."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.gpt_oss import modeling_gpt_oss as hf

from gptoss_jax.config import GptOssConfig
from gptoss_jax.model import MoE, apply_rope, rope_cos_sin, rope_frequencies
from gptoss_jax.ops import attention_mask, attention_with_sinks

from helpers import relative_error
from hf_models import hf_config

TOLERANCE = 1e-5  # float32 against float32 (relative error)


def _ours(hf_cfg) -> GptOssConfig:
    return GptOssConfig.from_hf_dict(json.loads(hf_cfg.to_json_string()))  # what save_pretrained writes


# ---- RoPE / YaRN -------------------------------------------------------------------------------------------

ROPES = {
    "released": dict(head_dim=64),  # the real model's rope on its head size
    "truncated": dict(
        head_dim=32,
        rope_parameters=dict(rope_type="yarn", rope_theta=50000.0, factor=8.0, beta_fast=24.0, beta_slow=2.0,
                             original_max_position_embeddings=2048, truncate=True),
    ),
    "plain": dict(head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
}


@pytest.mark.parametrize("case", sorted(ROPES))
def test_rope_tables_match_transformers(case):
    cfg = hf_config(**ROPES[case])
    rotary = hf.GptOssRotaryEmbedding(cfg)
    inv_freq, concentration = rope_frequencies(_ours(cfg))
    assert relative_error(inv_freq, rotary.inv_freq.numpy()) <= TOLERANCE
    assert concentration == pytest.approx(rotary.attention_scaling, rel=1e-12)

    rng = np.random.default_rng(0)
    nearby, far = rng.integers(0, 512, (2, 7)), rng.integers(0, 131072, (2, 7))
    cos_hf, sin_hf = rotary(torch.zeros(1), torch.tensor(nearby))
    cos, sin = rope_cos_sin(_ours(cfg), jnp.asarray(nearby))
    assert relative_error(cos, cos_hf.numpy()) <= TOLERANCE
    assert relative_error(sin, sin_hf.numpy()) <= TOLERANCE
    # Far positions make angles of ~1e5 radians, where one float32 ulp of the angle is ~1e-2: absolute bound.
    cos_hf, sin_hf = rotary(torch.zeros(1), torch.tensor(far))
    cos, sin = rope_cos_sin(_ours(cfg), jnp.asarray(far))
    np.testing.assert_allclose(cos, cos_hf.numpy(), atol=2e-2)
    np.testing.assert_allclose(sin, sin_hf.numpy(), atol=2e-2)


def test_yarn_blends_between_interpolated_and_original_frequencies():
    config = GptOssConfig.gpt_oss_20b()
    inv_freq, concentration = rope_frequencies(config)
    original = 1 / config.rope_theta ** (np.arange(32) * 2 / 64)
    assert concentration == pytest.approx(0.1 * math.log(32) + 1)
    # The ramp runs between pair 8.09 (32 turns in 4096 positions) and pair 17.39 (one turn).
    np.testing.assert_allclose(inv_freq[:9], original[:9], rtol=1e-6)  # fast pairs keep their frequency
    np.testing.assert_allclose(inv_freq[18:], original[18:] / 32, rtol=1e-6)  # slow pairs are interpolated
    assert np.all((inv_freq[9:18] < original[9:18]) & (inv_freq[9:18] > original[9:18] / 32))


def test_apply_rope_matches_transformers_half_split():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, 5, 4, 16)), rng.normal(size=(2, 5, 2, 16))
    cos, sin = rope_cos_sin(_ours(hf_config(head_dim=16)), jnp.asarray(rng.integers(0, 50, (2, 5))))
    # transformers wants [B, heads, T, head_dim] and the full-width cos/sin of its rotary module.
    q_hf, k_hf = hf.apply_rotary_pos_emb(
        torch.tensor(q).transpose(1, 2).float(), torch.tensor(k).transpose(1, 2).float(),
        torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin)),
    )
    ours_q = apply_rope(jnp.asarray(q, jnp.float32), cos, sin)
    ours_k = apply_rope(jnp.asarray(k, jnp.float32), cos, sin)
    assert relative_error(ours_q, q_hf.transpose(1, 2).numpy()) <= TOLERANCE
    assert relative_error(ours_k, k_hf.transpose(1, 2).numpy()) <= TOLERANCE


# ---- attention with sinks and window -----------------------------------------------------------------------


def _loop_attention(q, k, v, sinks, window, segments):
    """float64, one query row at a time: softmax over [visible scores..., sink], sink column dropped."""
    batch, length, heads, dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros(q.shape)
    for b in range(batch):
        for n in range(heads):
            for t in range(length):
                visible = [s for s in range(t + 1)
                           if (window is None or t - s < window) and segments[b, s] == segments[b, t]]
                logits = np.array([q[b, t, n] @ k[b, s, n // group] / math.sqrt(dim) for s in visible] + [sinks[n]])
                probs = np.exp(logits - logits.max())
                probs /= probs.sum()
                out[b, t, n] = sum(p * v[b, s, n // group] for p, s in zip(probs[:-1], visible, strict=True))
    return out


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("kv_heads", [1, 2, 6])
def test_attention_with_sinks_matches_loop_and_transformers(window, kv_heads):
    rng = np.random.default_rng(window or 0)
    batch, length, heads, dim = 2, 9, 6, 8
    q = rng.normal(size=(batch, length, heads, dim))
    k, v = rng.normal(size=(2, batch, length, kv_heads, dim))
    sinks = rng.normal(size=heads)
    segments = np.array([[0] * 9, [1] * 4 + [2] * 5])  # the second row packs two sequences
    mask = attention_mask(jnp.asarray(segments), window)
    as32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    out = attention_with_sinks(as32(q), as32(k), as32(v), as32(sinks), mask)

    assert relative_error(out, _loop_attention(q, k, v, sinks, window, segments)) <= TOLERANCE

    # transformers' eager attention takes [B, heads, T, dim] and an additive mask.
    module = torch.nn.Module()
    module.num_key_value_groups, module.sinks = heads // kv_heads, torch.tensor(sinks).float()
    additive = torch.where(torch.tensor(np.asarray(mask))[:, None], 0.0, torch.finfo(torch.float32).min)
    t = lambda x: torch.tensor(x).float().transpose(1, 2)  # noqa: E731
    expected, _ = hf.eager_attention_forward(module, t(q), t(k), t(v), additive, scaling=dim**-0.5)
    assert relative_error(out, expected.numpy()) <= TOLERANCE


def test_sinks_take_probability_mass():
    """With v = 1 everywhere the output is the total attention weight: below 1, lower for larger sinks."""
    rng = np.random.default_rng(3)
    q, k = (jnp.asarray(rng.normal(size=(1, 6, 2, 4)), jnp.float32) for _ in range(2))
    ones = jnp.ones((1, 6, 2, 4))
    mask = attention_mask(jnp.zeros((1, 6), jnp.int32), None)
    mass = attention_with_sinks(q, k, ones, jnp.array([-1.0, 2.0]), mask)[..., 0]
    assert np.all(mass < 1) and np.all(mass > 0)
    assert np.all(mass[..., 1] < mass[..., 0])


# ---- router and experts ------------------------------------------------------------------------------------


def _moe_pair(seed=0, std=0.3, **overrides):
    """Our MoE and transformers' router + experts holding the same random float32 weights."""
    cfg = hf_config(**overrides)
    torch.manual_seed(seed)
    router, experts = hf.GptOssTopKRouter(cfg), hf.GptOssExperts(cfg)
    for module in (router, experts):
        for param in module.parameters():
            torch.nn.init.normal_(param, std=std)
    moe = MoE(_ours(cfg), dtype="float32", rngs=nnx.Rngs(0))
    moe.router_w[...] = jnp.asarray(router.weight.detach().numpy())
    moe.router_b[...] = jnp.asarray(router.bias.detach().numpy())
    for ours, theirs in [("w_gate_up", "gate_up_proj"), ("b_gate_up", "gate_up_proj_bias"),
                         ("w_down", "down_proj"), ("b_down", "down_proj_bias")]:
        getattr(moe, ours)[...] = jnp.asarray(getattr(experts, theirs).detach().numpy())
    return moe, router, experts


def test_router_matches_transformers():
    moe, router, _ = _moe_pair()
    x = np.random.default_rng(4).normal(size=(20, 48)).astype(np.float32)
    _, scores, indices = router(torch.tensor(x))
    weights, experts, _ = moe.route(jnp.asarray(x))
    np.testing.assert_array_equal(experts, indices.numpy())
    assert relative_error(weights, scores.detach().numpy()) <= TOLERANCE
    np.testing.assert_allclose(np.sum(weights, axis=-1), 1, rtol=1e-6)


@pytest.mark.parametrize("num_tokens", [1, 3, 40])
def test_grouped_experts_match_loop_and_transformers(num_tokens, expert_path):
    """Few tokens leave most experts empty (zero-size groups); many tokens fill all of them."""
    moe, router, experts = _moe_pair(seed=num_tokens, num_local_experts=8)
    x = np.random.default_rng(num_tokens).normal(size=(num_tokens, 48)).astype(np.float32)
    _, scores, indices = router(torch.tensor(x))
    expected = experts(torch.tensor(x), indices, scores).detach().numpy()

    weights, chosen, _ = moe.route(jnp.asarray(x))
    grouped = moe.grouped_experts(jnp.asarray(x), weights, chosen)
    looped = moe.loop_over_experts(jnp.asarray(x), weights, chosen)
    assert relative_error(grouped, expected) <= TOLERANCE
    assert relative_error(looped, expected) <= TOLERANCE


@pytest.mark.parametrize("num_tokens", [1, 9])  # few pairs gather their experts; many form ragged groups
def test_packed_experts_equal_their_dequantized_weights(num_tokens):
    config = GptOssConfig.tiny().replace(num_experts=8, experts_per_token=4)
    packed = MoE(config, dtype="float32", mxfp4_experts=True, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(num_tokens).normal(size=(num_tokens, 64)), jnp.float32)
    weights, chosen, _ = packed.route(x)
    grouped, looped = packed.grouped_experts(x, weights, chosen), packed.loop_over_experts(x, weights, chosen)
    assert relative_error(grouped, looped) <= TOLERANCE


def test_swiglu_clamps_reach_the_output():
    """Inputs far beyond the ±7 limit: the clamped SwiGLU must still agree with transformers."""
    moe, router, experts = _moe_pair(seed=9, std=3.0)
    x = np.random.default_rng(5).normal(size=(16, 48)).astype(np.float32) * 5
    _, scores, indices = router(torch.tensor(x))
    expected = experts(torch.tensor(x), indices, scores).detach().numpy()
    weights, chosen, _ = moe.route(jnp.asarray(x))
    assert relative_error(moe.grouped_experts(jnp.asarray(x), weights, chosen), expected) <= TOLERANCE


def test_bfloat16_experts_follow_float32_reference():
    moe, _, _ = _moe_pair(seed=11)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(32, 48)), jnp.float32)
    weights, chosen, _ = moe.route(x)
    reference = moe.grouped_experts(x, weights, chosen)
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(moe))
    nnx.update(moe, bf16)
    out = moe.grouped_experts(x.astype(jnp.bfloat16), weights, chosen)
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, reference) <= 2e-2


@pytest.mark.parametrize("num_tokens", [1, 40])  # gathered experts (decoding) and the grouped matmul
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "mxfp4"])
def test_expert_gradients_match_the_loop_over_experts(num_tokens, packed, expert_path):
    """The dispatch's custom gradients (gathers both ways, the grouped matmul's loops, the adapters' products)
    against autodiff of `loop_over_experts` with the adapters merged: tokens, routing weights and LoRA factors."""
    from gptoss_jax.lora import LoraConfig, add_lora
    from gptoss_jax.model import GptOss, LoRAParam

    config = GptOssConfig.tiny().replace(num_hidden_layers=1, vocab_size=64)
    model = GptOss(config, dtype="float32", mxfp4_experts=packed, rngs=nnx.Rngs(1))
    add_lora(model, LoraConfig(rank=4, targets=("gate_up_proj", "down_proj")), rngs=nnx.Rngs(2))
    state = nnx.state(model, LoRAParam)
    nnx.update(model, jax.tree.map(lambda a: a + 0.05, state))  # b = 0 would hide errors
    graphdef, stacked = nnx.split(model.banded_blocks.mlp)
    moe = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked))  # the (only) layer
    rng = np.random.default_rng(num_tokens)
    x = jnp.asarray(rng.normal(size=(num_tokens, 64)), jnp.float32)
    weights, chosen, _ = moe.route(x)
    graphdef, adapters, rest = nnx.split(moe, LoRAParam, ...)
    cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def loss(method):
        def value(x, weights, adapters):
            module = nnx.merge(graphdef, adapters, rest)
            return jnp.sum(getattr(module, method)(x, weights, chosen) * cotangent)
        return jax.grad(value, argnums=(0, 1, 2))(x, weights, adapters)

    grouped, looped = loss("grouped_experts"), loss("loop_over_experts")
    for mine, expected in zip(jax.tree.leaves(grouped), jax.tree.leaves(looped), strict=True):
        assert np.abs(np.asarray(expected)).max() > 0
        assert relative_error(mine, expected) <= TOLERANCE


def test_named_scopes_name_the_layers_in_the_compiled_program():
    """A profile or a dumped HLO names the model's parts: each op's name carries its layer kind, attention or
    moe (router, experts), and the loss."""
    from gptoss_jax.model import GptOss
    from gptoss_jax.train.loss import token_losses

    model = GptOss(GptOssConfig.tiny().replace(vocab_size=512), dtype="float32", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.ones((1, 16), jnp.int32)

    def objective(params):
        model = nnx.merge(graphdef, params)
        hidden, _ = model.hidden_states(tokens)
        return token_losses(hidden, model.unembedding[...], tokens, jnp.ones(tokens.shape))

    program = jax.jit(jax.grad(objective)).lower(params).as_text(debug_info=True)
    for scope in ("banded_layer/attention/", "full_layer/moe/router/", "full_layer/moe/experts/",
                  "jvp(loss)/", "transpose(jvp(loss))/"):  # under jax.grad the loss's scope is named by its transforms
        assert scope in program, scope
