"""The gpt-oss transformer in Flax NNX, read top to bottom: norm, rotary embedding, attention with sinks,
mixture of experts, block, model.

Every parameter is declared once, with its shape, dtype and logical axis names (`axes` metadata); the
initialiser, `jax.eval_shape`, sharding and checkpoint loading all derive from those declarations. Logical
axes: layers, vocab, embed, q_heads, kv_heads, head_dim, experts, mlp.

Low-rank adapters (`LoRA`, parameters of type `LoRAParam`) can be attached to the attention projections, the
router and the experts (`gptoss_jax.lora.add_lora`); without them the parameter tree is exactly the base model's.

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


# ---- low-rank adapters ---------------------------------------------------------------------------------------


class LoRAParam(nnx.Param):
    """A low-rank adapter weight: the parameter type fine-tuning trains while the base stays frozen."""


class LoRA(nnx.Module):
    """The low-rank update `scaling * (x @ a) @ b` of one weight (one per expert, for expert weights).

    `b` starts at zero, so an adapted model starts as its base. PEFT's LoRA in our layout: `a` maps the weight's
    inputs to the rank, `b` the rank to its outputs, `scaling = alpha / rank`, dropout on the adapter's input.
    """

    def __init__(self, a: LoRAParam, b: LoRAParam, *, inputs: int, scaling: float, dropout: float = 0.0):
        self.a, self.b = a, b
        self.inputs = inputs  # how many of the weight's axes are inputs (2 for wo: heads, head_dim)
        self.scaling, self.dropout = scaling, dropout

    def __call__(self, x: jax.Array, into_rank: str, out_of_rank: str, key: jax.Array | None = None) -> jax.Array:
        if self.dropout and key is not None:
            keep = jax.random.bernoulli(key, 1 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1 - self.dropout), 0).astype(x.dtype)
        low = jnp.einsum(into_rank, x, self.a[...].astype(x.dtype))
        return jnp.einsum(out_of_rank, low, self.b[...].astype(x.dtype)) * self.scaling

    def grouped(self, rows: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """Per-expert update of rows sorted by expert: a [E, in, rank], b [E, rank, out]."""
        low = jax.lax.ragged_dot(rows, self.a[...].astype(rows.dtype), group_sizes)
        out = jax.lax.ragged_dot(low, self.b[...].astype(rows.dtype), group_sizes, preferred_element_type=jnp.float32)
        return out * self.scaling

    def delta(self) -> jax.Array:
        """The dense update of the weight, scaling * a @ b, batched over the leading (layer, expert) axes."""
        a, b = self.a[...], self.b[...]
        lead = a.ndim - self.inputs - 1
        product = a.reshape(*a.shape[:lead], -1, a.shape[-1]) @ b.reshape(*b.shape[: lead + 1], -1)
        return product.reshape(*a.shape[:-1], *b.shape[lead + 1 :]) * self.scaling


def _low_rank(adapters: nnx.Dict, name: str, x: jax.Array, into_rank: str, out_of_rank: str, key=None):
    """The adapter update of the named weight, or 0 when it has none."""
    adapter = adapters.get(name)
    return 0.0 if adapter is None else adapter(x, into_rank, out_of_rank, key)


def _key(key: jax.Array | None, index: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, index)


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
        self.adapters = nnx.Dict()  # LoRA of wq, wk, wv, wo

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, key=None) -> jax.Array:
        a = self.adapters
        q = jnp.einsum("btd,dnh->btnh", x, self.wq[...]) + self.bq[...]
        q += _low_rank(a, "wq", x, "btd,dr->btr", "btr,rnh->btnh", _key(key, 0))
        k = jnp.einsum("btd,dkh->btkh", x, self.wk[...]) + self.bk[...]
        k += _low_rank(a, "wk", x, "btd,dr->btr", "btr,rkh->btkh", _key(key, 1))
        v = jnp.einsum("btd,dkh->btkh", x, self.wv[...]) + self.bv[...]
        v += _low_rank(a, "wv", x, "btd,dr->btr", "btr,rkh->btkh", _key(key, 2))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention_with_sinks(q, k, v, self.sinks[...], mask)
        projected = jnp.einsum("btnh,nhd->btd", out, self.wo[...]) + self.bo[...]
        return projected + _low_rank(a, "wo", out, "btnh,nhr->btr", "btr,rd->btd", _key(key, 3))


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
        self.adapters = nnx.Dict()  # LoRA of router_w, w_gate_up, w_down

    def expert_weights(self, dtype) -> tuple[jax.Array, jax.Array]:
        """The gate-up [E, D, 2F] and down [E, F, D] weights, dense: MXFP4 ones are dequantized at every use."""
        return tuple(_dense(param.get_value(), dtype) for param in (self.w_gate_up, self.w_down))

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [N, D] -> (weights [N, k] summing to 1, expert ids [N, k], router logits [N, E]), in float32."""
        x = x.astype(jnp.float32)
        logits = x @ self.router_w[...].astype(jnp.float32) + self.router_b[...].astype(jnp.float32)
        logits += _low_rank(self.adapters, "router_w", x, "nd,dr->nr", "nr,re->ne")
        top_logits, experts = jax.lax.top_k(logits, self.experts_per_token)
        return jax.nn.softmax(top_logits, axis=-1), experts, logits

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (output, [router z-loss, load-balancing loss]) — the auxiliary losses fine-tuning may add."""
        batch, length, dim = x.shape
        tokens = x.reshape(batch * length, dim)
        weights, experts, logits = self.route(tokens)
        out = self.grouped_experts(tokens, weights, experts).reshape(batch, length, dim)
        return out, router_losses(logits, experts)

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
        h += self._grouped_low_rank("w_gate_up", rows, group_sizes)
        h = clamped_swiglu(h + self.b_gate_up[...][sorted_experts], **self.swiglu).astype(tokens.dtype)
        out = jax.lax.ragged_dot(h, w_down, group_sizes, preferred_element_type=jnp.float32)
        out += self._grouped_low_rank("w_down", h, group_sizes)
        out = (out + self.b_down[...][sorted_experts]) * weights.reshape(-1)[order][:, None]
        unsorted = jnp.zeros_like(out).at[order].set(out)
        return unsorted.reshape(num_tokens, k, -1).sum(axis=1).astype(tokens.dtype)

    def _grouped_low_rank(self, name: str, rows: jax.Array, group_sizes: jax.Array):
        adapter = self.adapters.get(name)
        return 0.0 if adapter is None else adapter.grouped(rows, group_sizes)

    def loop_over_experts(self, tokens: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
        """Slow reference for `grouped_experts`: every expert runs densely on every token, weighted by routing;
        adapters are merged into the weights first."""
        out = jnp.zeros(tokens.shape, jnp.float32)
        w_gate_up, w_down = self.expert_weights(jnp.float32)
        if "w_gate_up" in self.adapters:
            w_gate_up += self.adapters["w_gate_up"].delta()
        if "w_down" in self.adapters:
            w_down += self.adapters["w_down"].delta()
        for e in range(w_gate_up.shape[0]):
            token_weight = jnp.where(experts == e, weights, 0.0).sum(axis=-1, keepdims=True)
            h = tokens.astype(jnp.float32) @ w_gate_up[e] + self.b_gate_up[e]
            h = clamped_swiglu(h, **self.swiglu) @ w_down[e] + self.b_down[e]
            out += token_weight * h
        return out.astype(tokens.dtype)


def router_losses(logits: jax.Array, experts: jax.Array) -> jax.Array:
    """[z-loss, load-balancing loss] of one layer's routing: the mean squared log-partition of the router
    logits, and E * sum_e (share of assignments to e) * (mean router probability of e), 1 when balanced."""
    num_experts = logits.shape[-1]
    z_loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    share = jnp.bincount(experts.reshape(-1), length=num_experts) / experts.size
    balance = num_experts * jnp.sum(share * jax.nn.softmax(logits, axis=-1).mean(axis=0))
    return jnp.stack([z_loss, balance])


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

    def __call__(self, x, cos, sin, mask, key=None) -> tuple[jax.Array, jax.Array]:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, key)
        out, router = self.mlp(self.mlp_norm(x))
        return x + out, router


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
        hidden, _ = self.hidden_states(tokens, positions=positions, segment_ids=segment_ids)
        return self.logits(hidden)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states [..., D] -> logits [..., V] (untied unembedding, no bias)."""
        return jnp.einsum("...d,vd->...v", hidden, self.unembedding[...])

    def hidden_states(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        remat: str = "none",
    ) -> tuple[jax.Array, jax.Array]:
        """(normed final hidden states [B, T, D], [router z-loss, load-balancing loss] averaged over layers).

        dropout_key: enables LoRA dropout. remat: what the backward pass recomputes per layer — "none",
        "full" (keep only each layer's input) or "dots" (keep matmul outputs, recompute the rest).
        """
        batch, length = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        if segment_ids is None:
            segment_ids = jnp.zeros((batch, length), jnp.int32)
        cos, sin = rope_cos_sin(self.config, positions)
        masks = (attention_mask(segment_ids, self.config.sliding_window), attention_mask(segment_ids, None))
        banded_def, banded_layers = nnx.split(self.banded_blocks)
        full_def, full_layers = nnx.split(self.full_blocks)
        keys = None if dropout_key is None else jax.random.split(dropout_key, self.config.num_hidden_layers)

        def layer_pair(x, layers):
            banded, full, pair_keys = layers
            x, banded_router = nnx.merge(banded_def, banded)(x, cos, sin, masks[0], _at(pair_keys, 0))
            x, full_router = nnx.merge(full_def, full)(x, cos, sin, masks[1], _at(pair_keys, 1))
            return x, banded_router + full_router

        if remat != "none":
            layer_pair = jax.checkpoint(layer_pair, policy=_REMAT_POLICIES[remat])
        pairs = self.config.num_full_layers
        pair_keys = None if keys is None else keys[: 2 * pairs].reshape(pairs, 2, *keys.shape[1:])
        x = self.embedding[...][tokens]
        x, router = jax.lax.scan(layer_pair, x, (_layers(banded_layers, slice(0, pairs)), full_layers, pair_keys))
        router = router.sum(axis=0)
        if self.config.num_banded_layers > pairs:  # an odd layer count ends on a banded layer
            last = nnx.merge(banded_def, _layers(banded_layers, -1))
            x, last_router = last(x, cos, sin, masks[0], _at(keys, -1))
            router += last_router
        return self.norm(x), router / self.config.num_hidden_layers


_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _at(keys: jax.Array | None, index: int) -> jax.Array | None:
    return None if keys is None else keys[index]


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
