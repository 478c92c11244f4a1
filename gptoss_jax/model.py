"""The gpt-oss transformer in Flax NNX, read top to bottom: norm, rotary embedding, attention with sinks,
mixture of experts, block, model.

Every parameter is declared once, with its shape, dtype and logical axis names (`axes` metadata); the
initialiser, `jax.eval_shape`, sharding and checkpoint loading all derive from those declarations. Logical
axes: layers, vocab, embed, q_heads, kv_heads, head_dim, experts, mlp.

The experts' two weight stacks may be held in MXFP4 (`mxfp4_experts=True`, as the released checkpoints store
them): they stay packed in device memory and are dequantized where they are used.

Dtype policy (as the reference implementation): parameters and activations in the model dtype (bf16 by
default); normalisation, softmax, routing and the SwiGLU epilogue in float32; matmuls accumulate in float32.

Layers alternate between banded attention (even layers: the last `sliding_window` keys) and full causal
attention (odd layers). The two kinds are stored as two stacks (`banded_blocks`, `full_blocks`, leading
`layers` axis) and the forward pass scans over (banded, full) pairs, so compile time does not grow with depth.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.config import GptOssConfig
from gptoss_jax.mxfp4 import Mxfp4Weight

_normal = nnx.initializers.normal(0.02)
_zeros = nnx.initializers.zeros
_ones = nnx.initializers.ones


def _param(rngs: nnx.Rngs, shape, axes, dtype, init=_normal) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, dtype), axes=axes)


# ---- RMSNorm ------------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    def __init__(self, config: GptOssConfig, *, rngs: nnx.Rngs):
        # The scale stays float32 whatever the model dtype, as in the reference.
        self.scale = _param(rngs, (config.hidden_size,), ("embed",), jnp.float32, _ones)
        self.eps = config.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...]).astype(x.dtype)


# ---- rotary position embedding (YaRN) -----------------------------------------------------------------------


def rope_frequencies(config: GptOssConfig) -> tuple[np.ndarray, float]:
    """Inverse frequency of each rotated pair [head_dim / 2], and YaRN's attention concentration.

    YaRN interpolates the low frequencies (divides them by the scaling factor) and keeps the high ones; a linear
    ramp over the pair index, between the pairs that turn `beta_fast` and `beta_slow` times over the original
    context, blends the two. The concentration multiplies cos and sin (so it scales attention logits by its
    square).
    """
    half = config.head_dim // 2
    theta_powers = config.rope_theta ** (np.arange(half, dtype=np.float32) * 2 / config.head_dim)
    factor = config.rope_scaling_factor
    if factor == 1.0:
        return (1.0 / theta_powers).astype(np.float32), 1.0

    def pair_turning(rotations: float) -> float:
        # The pair index whose wavelength fits `rotations` times into the original context.
        context = config.initial_context_length
        return half * math.log(context / (rotations * 2 * math.pi)) / math.log(config.rope_theta)

    low, high = pair_turning(config.rope_beta_fast), pair_turning(config.rope_beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    # transformers clips the bounds to the valid pair range; this changes nothing for the released models.
    low, high = max(low, 0), min(high, config.head_dim - 1)
    high = high if high != low else high + 1e-3
    ramp = np.clip((np.arange(half, dtype=np.float32) - low) / (high - low), 0, 1)
    keep_original = 1 - ramp
    inv_freq = (1 / (factor * theta_powers)) * ramp + (1 / theta_powers) * keep_original
    return inv_freq.astype(np.float32), 0.1 * math.log(factor) + 1.0


def rope_cos_sin(config: GptOssConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B, T, head_dim / 2] (float32) for int positions [B, T]."""
    inv_freq, concentration = rope_frequencies(config)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles) * concentration, jnp.sin(angles) * concentration


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, heads, head_dim] pairing element i with element i + head_dim/2 (half-split)."""
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


# ---- attention with sinks ----------------------------------------------------------------------------------


def attention_mask(segment_ids: jax.Array, window: int | None) -> jax.Array:
    """[B, T, S] bool: causal, within `window` keys (the query's own included) if given, same segment only."""
    length = segment_ids.shape[1]
    query, key = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= query - key < window
    return allowed[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])


def attention_with_sinks(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query softmax attention whose every row also competes with a learned per-head sink logit.

    q [B, T, N, H], k and v [B, S, K, H], sinks [N] (float32), mask [B, T, S] bool -> [B, T, N, H].
    The sink is one more column in the softmax that has no value: it takes probability mass away, so a row's
    weights sum to less than one, and a fully masked row gives zeros rather than NaN.
    """
    batch, length, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q = q.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    sink = sinks.astype(jnp.float32).reshape(1, num_kv_heads, -1, 1, 1)
    peak = jnp.maximum(scores.max(axis=-1, keepdims=True), sink)
    weights = jnp.exp(scores - peak)
    probs = weights / (weights.sum(axis=-1, keepdims=True) + jnp.exp(sink - peak))
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, length, num_heads, head_dim).astype(v.dtype)


class Attention(nnx.Module):
    def __init__(self, config: GptOssConfig, *, dtype, rngs: nnx.Rngs):
        d, n, k, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.wq = _param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), dtype)
        self.bq = _param(rngs, (n, h), ("q_heads", "head_dim"), dtype, _zeros)
        self.wk = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.bk = _param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, _zeros)
        self.wv = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.bv = _param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, _zeros)
        self.wo = _param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), dtype)
        self.bo = _param(rngs, (d,), ("embed",), dtype, _zeros)
        self.sinks = _param(rngs, (n,), ("q_heads",), jnp.float32)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        q = jnp.einsum("btd,dnh->btnh", x, self.wq[...]) + self.bq[...]
        k = jnp.einsum("btd,dkh->btkh", x, self.wk[...]) + self.bk[...]
        v = jnp.einsum("btd,dkh->btkh", x, self.wv[...]) + self.bv[...]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention_with_sinks(q, k, v, self.sinks[...], mask)
        return jnp.einsum("btnh,nhd->btd", out, self.wo[...]) + self.bo[...]


# ---- mixture of experts ------------------------------------------------------------------------------------


def clamped_swiglu(h: jax.Array, alpha: float, limit: float) -> jax.Array:
    """gpt-oss's SwiGLU on interleaved columns (gate = even, linear = odd), clamped for stability."""
    gate, linear = h[..., ::2], h[..., 1::2]
    gate = jnp.minimum(gate, limit)
    linear = jnp.clip(linear, -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (linear + 1)


class MoE(nnx.Module):
    def __init__(self, config: GptOssConfig, *, dtype, mxfp4_experts: bool = False, rngs: nnx.Rngs):
        d, e, f = config.hidden_size, config.num_experts, config.intermediate_size
        self.router_w = _param(rngs, (d, e), ("embed", "experts"), dtype)
        self.router_b = _param(rngs, (e,), ("experts",), dtype)
        # Columns of the first projection interleave gate and linear units (see `clamped_swiglu`).
        self.w_gate_up = _expert_param(rngs, (e, d, 2 * f), ("experts", "embed", "mlp"), dtype, mxfp4_experts)
        self.b_gate_up = _param(rngs, (e, 2 * f), ("experts", "mlp"), dtype, _zeros)
        self.w_down = _expert_param(rngs, (e, f, d), ("experts", "mlp", "embed"), dtype, mxfp4_experts)
        self.b_down = _param(rngs, (e, d), ("experts", "embed"), dtype, _zeros)
        self.experts_per_token = config.experts_per_token
        self.swiglu = dict(alpha=config.swiglu_alpha, limit=config.swiglu_limit)

    def expert_weights(self, dtype) -> tuple[jax.Array, jax.Array]:
        """The gate-up [E, D, 2F] and down [E, F, D] weights, dense: MXFP4 ones are dequantized at every use."""
        return tuple(_dense(param.get_value(), dtype) for param in (self.w_gate_up, self.w_down))

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [N, D] -> (weights [N, k] float32 summing to 1, expert ids [N, k] int32), in float32."""
        logits = x.astype(jnp.float32) @ self.router_w[...].astype(jnp.float32)
        logits += self.router_b[...].astype(jnp.float32)
        top_logits, experts = jax.lax.top_k(logits, self.experts_per_token)
        return jax.nn.softmax(top_logits, axis=-1), experts

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, dim = x.shape
        tokens = x.reshape(batch * length, dim)
        weights, experts = self.route(tokens)
        return self.grouped_experts(tokens, weights, experts).reshape(batch, length, dim)

    def grouped_experts(self, tokens: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
        """Sorts the (token, expert) pairs by expert and runs each expert's rows as one group of a ragged matmul."""
        num_tokens, k = experts.shape
        w_gate_up, w_down = self.expert_weights(tokens.dtype)
        num_experts = w_gate_up.shape[0]
        flat_experts = experts.reshape(-1)
        order = jnp.argsort(flat_experts, stable=True)
        sorted_experts = flat_experts[order]
        group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
        rows = tokens[order // k]
        h = jax.lax.ragged_dot(rows, w_gate_up, group_sizes, preferred_element_type=jnp.float32)
        h = clamped_swiglu(h + self.b_gate_up[...][sorted_experts], **self.swiglu)
        out = jax.lax.ragged_dot(
            h.astype(tokens.dtype), w_down, group_sizes, preferred_element_type=jnp.float32
        )
        out = (out + self.b_down[...][sorted_experts]) * weights.reshape(-1)[order][:, None]
        unsorted = jnp.zeros_like(out).at[order].set(out)
        return unsorted.reshape(num_tokens, k, -1).sum(axis=1).astype(tokens.dtype)

    def loop_over_experts(self, tokens: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
        """Slow reference for `grouped_experts`: every expert runs densely on every token, weighted by routing."""
        out = jnp.zeros(tokens.shape, jnp.float32)
        w_gate_up, w_down = self.expert_weights(jnp.float32)
        for e in range(w_gate_up.shape[0]):
            token_weight = jnp.where(experts == e, weights, 0.0).sum(axis=-1, keepdims=True)
            h = tokens.astype(jnp.float32) @ w_gate_up[e] + self.b_gate_up[e]
            h = clamped_swiglu(h, **self.swiglu) @ w_down[e] + self.b_down[e]
            out += token_weight * h
        return out.astype(tokens.dtype)


def _expert_param(rngs: nnx.Rngs, shape, axes, dtype, mxfp4: bool) -> nnx.Param:
    value = _normal(rngs.params(), shape, dtype)
    return nnx.Param(Mxfp4Weight.quantize(value) if mxfp4 else value, axes=axes)


def _dense(weight: jax.Array | Mxfp4Weight, dtype) -> jax.Array:
    return weight.dequantize(dtype) if isinstance(weight, Mxfp4Weight) else weight.astype(dtype)


# ---- transformer block and model ---------------------------------------------------------------------------


class Block(nnx.Module):
    def __init__(self, config: GptOssConfig, *, dtype, mxfp4_experts: bool, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config, rngs=rngs)
        self.attn = Attention(config, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(config, rngs=rngs)
        self.mlp = MoE(config, dtype=dtype, mxfp4_experts=mxfp4_experts, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


def _stacked_blocks(count: int, config: GptOssConfig, dtype, mxfp4_experts: bool, rngs: nnx.Rngs) -> Block:
    """`count` blocks whose parameters carry a leading `layers` axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(axis_size=count, transform_metadata={nnx.PARTITION_NAME: "layers", "axes": "layers"})
    def make(rngs: nnx.Rngs) -> Block:
        return Block(config, dtype=dtype, mxfp4_experts=mxfp4_experts, rngs=rngs)

    return make(rngs)


class GptOss(nnx.Module):
    """gpt-oss causal LM: `model(tokens [B, T] int32) -> logits [B, T, vocab]` in the model dtype.

    `mxfp4_experts`: hold the expert weights as `Mxfp4Weight` (4.25 bits per value) instead of `dtype`.
    """

    def __init__(self, config: GptOssConfig, *, dtype="bfloat16", mxfp4_experts: bool = False, rngs: nnx.Rngs):
        dtype = jnp.dtype(dtype)
        self.config = config
        self.dtype = dtype
        self.embedding = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), dtype)
        self.banded_blocks = _stacked_blocks(config.num_banded_layers, config, dtype, mxfp4_experts, rngs)
        self.full_blocks = _stacked_blocks(config.num_full_layers, config, dtype, mxfp4_experts, rngs)
        self.norm = RMSNorm(config, rngs=rngs)
        self.unembedding = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), dtype)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """tokens [B, T] int -> logits [B, T, V].

        positions [B, T]: RoPE positions (default 0..T-1). segment_ids [B, T]: tokens attend only to earlier
        tokens of the same segment — for packed sequences, and for padding (give pad tokens their own id).
        """
        batch, length = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        if segment_ids is None:
            segment_ids = jnp.zeros((batch, length), jnp.int32)
        cos, sin = rope_cos_sin(self.config, positions)
        banded_mask = attention_mask(segment_ids, self.config.sliding_window)
        full_mask = attention_mask(segment_ids, None)

        banded_def, banded_layers = nnx.split(self.banded_blocks)
        full_def, full_layers = nnx.split(self.full_blocks)

        def layer_pair(x, layers):
            banded, full = layers
            x = nnx.merge(banded_def, banded)(x, cos, sin, banded_mask)
            return nnx.merge(full_def, full)(x, cos, sin, full_mask), None

        pairs = self.config.num_full_layers
        x = self.embedding[...][tokens]
        x, _ = jax.lax.scan(layer_pair, x, (_layers(banded_layers, slice(0, pairs)), full_layers))
        if self.config.num_banded_layers > pairs:  # an odd layer count ends on a banded layer
            x = nnx.merge(banded_def, _layers(banded_layers, -1))(x, cos, sin, banded_mask)
        x = self.norm(x)
        return jnp.einsum("btd,vd->btv", x, self.unembedding[...])


def _layers(stacked: nnx.State, index) -> nnx.State:
    return jax.tree.map(lambda leaf: leaf[index], stacked)


# ---- sizes ---------------------------------------------------------------------------------------------------


def parameter_counts(config: GptOssConfig) -> tuple[int, int]:
    """(total, active per token) parameter counts, from shapes alone (nothing is allocated).

    Active counts the unembedding but not the embedding (a lookup), and only `experts_per_token` of the
    experts' weights and biases.
    """
    model = nnx.eval_shape(lambda: GptOss(config, rngs=nnx.Rngs(0)))
    sizes = {path: math.prod(param.shape) for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    total = sum(sizes.values())
    experts = sum(size for path, size in sizes.items() if path[-1] in ("w_gate_up", "b_gate_up", "w_down", "b_down"))
    inactive = sizes[("embedding",)] + experts * (1 - config.experts_per_token / config.num_experts)
    return total, round(total - inactive)
