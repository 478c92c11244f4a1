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

import dataclasses
import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from gptoss_jax import sharding
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kernels.attention import decode_attention, flash_attention
from gptoss_jax.kernels.mxfp4_matmul import group_tiles, mxfp4_ragged_matmul
from gptoss_jax.mxfp4 import BLOCK_SIZE, Mxfp4Weight

log = logging.getLogger(__name__)

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


class SegmentMask(NamedTuple):
    """Causal attention within `window` keys (None: all earlier ones) among tokens of the same segment, in the
    form the flash kernel takes; the XLA path expands it with `attention_mask`."""

    segment_ids: jax.Array  # [B, T]
    window: int | None


def attend(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, mask: SegmentMask | jax.Array,
           kernels: str = "xla") -> jax.Array:
    """`attention_with_sinks`, through the Pallas kernels when `kernels` asks for them: flash attention for a
    segment mask over the step's own keys, decode attention for one query against a cache (a dense mask)."""
    kernel = _use_kernels(kernels)
    if isinstance(mask, SegmentMask):
        if kernel and q.shape[1] == k.shape[1]:
            log.info("attention: Pallas flash attention%s", _interpret_note())
            return flash_attention(q, k, v, sinks, mask.segment_ids, window=mask.window, interpret=not _on_gpu())
        mask = attention_mask(mask.segment_ids, mask.window)
    elif kernel and q.shape[1] == 1:
        log.info("attention: Pallas decode attention%s", _interpret_note())
        return decode_attention(q, k, v, sinks, mask[:, 0], interpret=not _on_gpu())
    return attention_with_sinks(q, k, v, sinks, mask)


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
        self.kernels = config.kernels
        self.adapters = nnx.Dict()  # LoRA of wq, wk, wv, wo

    def __call__(self, x, cos, sin, mask, key=None, attend_to=None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """-> (output, keys, values attended). `attend_to(k, v)` gives the keys and values to attend over
        (a KV cache updated with this step's); by default the step's own."""
        a = self.adapters
        q = jnp.einsum("btd,dnh->btnh", x, self.wq[...]) + self.bq[...]
        q += _low_rank(a, "wq", x, "btd,dr->btr", "btr,rnh->btnh", _key(key, 0))
        k = jnp.einsum("btd,dkh->btkh", x, self.wk[...]) + self.bk[...]
        k += _low_rank(a, "wk", x, "btd,dr->btr", "btr,rkh->btkh", _key(key, 1))
        v = jnp.einsum("btd,dkh->btkh", x, self.wv[...]) + self.bv[...]
        v += _low_rank(a, "wv", x, "btd,dr->btr", "btr,rkh->btkh", _key(key, 2))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = (k, v) if attend_to is None else attend_to(k, v)
        out = attend(q, keys, values, self.sinks[...], mask, self.kernels)
        projected = jnp.einsum("btnh,nhd->btd", out, self.wo[...]) + self.bo[...]
        return projected + _low_rank(a, "wo", out, "btnh,nhr->btr", "btr,rd->btd", _key(key, 3)), keys, values


# ---- mixture of experts ------------------------------------------------------------------------------------


def clamped_swiglu(h: jax.Array, alpha: float, limit: float) -> jax.Array:
    """gpt-oss's SwiGLU on interleaved columns (gate = even, linear = odd), clamped for stability. (Split by a
    reshape rather than strided slices, which the Pallas kernels' Triton lowering cannot express.)"""
    gate, linear = jax.lax.unstack(h.reshape(*h.shape[:-1], h.shape[-1] // 2, 2), axis=-1)
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
        self.kernels = config.kernels
        self.adapters = nnx.Dict()  # LoRA of router_w, w_gate_up, w_down
        self.mesh = None  # set by sharding.shard_model: with an expert axis, the experts run expert-parallel

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
        if self.mesh is not None and self.mesh.shape["expert"] > 1:
            out = self._expert_parallel(tokens, weights, experts)
        else:
            out = self.grouped_experts(tokens, weights, experts)
        return out.reshape(batch, length, dim), router_losses(logits, experts)

    def grouped_experts(self, tokens: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
        """All experts here: each expert's (token, expert) pairs are one group of a ragged matmul."""
        return _grouped_experts(tokens, weights, experts, self.w_gate_up.get_value(), self.b_gate_up[...],
                                self.w_down.get_value(), self.b_down[...], self._low_rank_factors(), self.swiglu,
                                self.kernels)

    def _low_rank_factors(self) -> dict[str, tuple[jax.Array, jax.Array, float]]:
        return {name: (adapter.a[...], adapter.b[...], adapter.scaling) for name, adapter in self.adapters.items()
                if name in ("w_gate_up", "w_down")}

    def _expert_parallel(self, tokens: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
        """The experts split over the mesh's `expert` axis (and their intermediate dimension over `tensor`),
        under shard_map: every device routes its tokens' pairs to the experts it holds, computes them, and one
        psum over (expert, tensor) adds the partial outputs. Parameters sharded over fsdp are gathered first."""
        mesh = self.mesh
        expert, tensor = "expert", ("tensor" if self._splits_intermediate() else None)
        packed = isinstance(self.w_gate_up.get_value(), Mxfp4Weight)
        rows = PartitionSpec(*sharding.batch_spec(tokens.shape[0], mesh), None)
        params = {
            "w_gate_up": self.w_gate_up.get_value(), "b_gate_up": self.b_gate_up[...],
            "w_down": self.w_down.get_value(), "b_down": self.b_down[...], "low_rank": self._low_rank_factors(),
        }
        specs = {
            "w_gate_up": (Mxfp4Weight(PartitionSpec(expert, tensor, None, None), PartitionSpec(expert, tensor, None))
                          if packed else PartitionSpec(expert, None, tensor)),
            "b_gate_up": PartitionSpec(expert, tensor),
            "w_down": (Mxfp4Weight(PartitionSpec(expert, None, tensor, None), PartitionSpec(expert, None, tensor))
                       if packed else PartitionSpec(expert, tensor, None)),
            "b_down": PartitionSpec(expert, None),
            "low_rank": {name: (PartitionSpec(expert, None if name == "w_gate_up" else tensor, None),
                                PartitionSpec(expert, None, tensor if name == "w_gate_up" else None), None)
                         for name in params["low_rank"]},
        }

        def local(tokens, weights, experts, params):
            here = params["b_gate_up"].shape[0]
            local_ids = experts - jax.lax.axis_index(expert) * here
            mine = (local_ids >= 0) & (local_ids < here)
            b_down = params["b_down"]
            if tensor:  # the intermediate is split: add the down projection's bias on one tensor shard only
                b_down = b_down * (jax.lax.axis_index(tensor) == 0)
            out = _grouped_experts(tokens, jnp.where(mine, weights, 0.0), jnp.where(mine, local_ids, here),
                                   params["w_gate_up"], params["b_gate_up"], params["w_down"], b_down,
                                   params["low_rank"], self.swiglu, self.kernels)
            return jax.lax.psum(out, (expert, tensor) if tensor else expert)

        return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, specs), out_specs=rows,
                             check_vma=False)(tokens, weights, experts, params)

    def _splits_intermediate(self) -> bool:
        """Whether the experts' intermediate dimension F splits over `tensor` (whole gate/linear pairs, and whole
        MXFP4 blocks)."""
        ways, intermediate = self.mesh.shape["tensor"], self.b_gate_up.shape[-1] // 2
        packed = isinstance(self.w_gate_up.get_value(), Mxfp4Weight)
        return ways > 1 and intermediate % ways == 0 and not (packed and (intermediate // BLOCK_SIZE) % ways)

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


def _grouped_experts(tokens, weights, experts, w_gate_up, b_gate_up, w_down, b_down, low_rank, swiglu,
                     kernels="xla"):
    """The experts' outputs for (token, expert) pairs, weighted and summed per token.

    tokens [N, D], weights and experts [N, k]; an expert id equal to the number of experts here marks a pair
    handled elsewhere (expert parallelism): it has weight 0. w_gate_up / w_down: dense or MXFP4 weights.
    low_rank: LoRA factors (a, b, scaling) of "w_gate_up" / "w_down", one per expert.

    Fewer pairs than experts (decoding): each pair's expert weights are gathered — and only those dequantized —
    so a step reads k experts per token, not all of them. Otherwise the pairs are sorted by expert and each
    expert's rows form one group of a ragged matmul over the (dequantized) weights. With the Pallas kernel
    (`kernels`, packed weights), every case is one ragged matmul that dequantizes tiles as it goes, bias and
    SwiGLU fused (SwiGLU only without a gate-up adapter, whose update comes before it).
    """
    num_tokens, k = experts.shape
    num_experts = b_gate_up.shape[0]
    kernel = _expert_kernel(kernels, w_gate_up)
    if num_tokens * k < num_experts and kernel is None:
        return _gathered_experts(tokens, weights, experts, w_gate_up, b_gate_up, w_down, b_down, low_rank, swiglu)
    flat_experts = experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    rows = tokens[order // k]

    def update(name, x):
        if name not in low_rank:
            return 0.0
        a, b, scaling = low_rank[name]
        inner = ragged_matmul(x, a.astype(x.dtype), group_sizes).astype(x.dtype)
        return ragged_matmul(inner, b.astype(x.dtype), group_sizes) * scaling

    if kernel is not None:
        fused = None if "w_gate_up" in low_rank else (swiglu["alpha"], swiglu["limit"])
        h = kernel(rows, w_gate_up, group_sizes, b_gate_up, swiglu=fused)
        if fused is None:
            h = clamped_swiglu(h + update("w_gate_up", rows), **swiglu)
        h = h.astype(tokens.dtype)
        out = kernel(h, w_down, group_sizes, b_down) + update("w_down", h)
    else:
        w_gate_up, w_down = _dense(w_gate_up, tokens.dtype), _dense(w_down, tokens.dtype)
        sorted_experts = jnp.minimum(flat_experts[order], num_experts - 1)  # bias rows for pairs not here: unused
        h = ragged_matmul(rows, w_gate_up, group_sizes)
        h = clamped_swiglu(h + update("w_gate_up", rows) + b_gate_up[sorted_experts], **swiglu).astype(tokens.dtype)
        out = ragged_matmul(h, w_down, group_sizes) + update("w_down", h) + b_down[sorted_experts]
    out = out * weights.reshape(-1)[order][:, None]
    unsorted = jnp.zeros_like(out).at[order].set(out)
    return unsorted.reshape(num_tokens, k, -1).sum(axis=1).astype(tokens.dtype)


def _expert_kernel(kernels: str, weight):
    """The Pallas MXFP4 matmul if `kernels` asks for kernels and the weights are packed; None for the XLA path.
    Logs the choice each time a forward is traced."""
    if not (isinstance(weight, Mxfp4Weight) and _use_kernels(kernels)):
        return None
    log.info("MoE experts: Pallas MXFP4 kernel%s", _interpret_note())
    return functools.partial(mxfp4_ragged_matmul, interpret=not _on_gpu())


def _use_kernels(kernels: str) -> bool:
    """GptOssConfig.kernels: "pallas" always (interpret mode off a GPU), "auto" on a GPU, "xla" never."""
    return kernels == "pallas" or (kernels == "auto" and _on_gpu())


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _interpret_note() -> str:
    return "" if _on_gpu() else " (interpret mode: no GPU)"


def ragged_matmul(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array, tile: int = 64) -> jax.Array:
    """rows [M, K] (sorted by group) times their group's weights [G, K, N] -> [M, N] in float32; rows past the
    groups give zeros. `jax.lax.ragged_dot`, except on a CPU, where XLA lowers it to every group's work for every
    row: there each group's rows are padded to whole tiles and every tile multiplies by its group's weights
    (3-7x faster at gpt-oss shapes, the same arithmetic)."""
    if jax.default_backend() != "cpu":
        return jax.lax.ragged_dot(rows, weights, group_sizes, preferred_element_type=jnp.float32)
    layout = group_tiles(group_sizes, rows.shape[0], tile)
    tiled = jnp.zeros((layout.tiles * tile, rows.shape[1]), rows.dtype).at[layout.destination].set(rows, mode="drop")
    products = jax.lax.map(lambda piece: jnp.dot(piece[0], weights[piece[1]], preferred_element_type=jnp.float32),
                           (tiled.reshape(layout.tiles, tile, -1), layout.tile_group))
    gathered = products.reshape(layout.tiles * tile, -1).at[layout.destination].get(mode="fill", fill_value=0)
    return jnp.where(layout.valid[:, None], gathered, 0)


def _gathered_experts(tokens, weights, experts, w_gate_up, b_gate_up, w_down, b_down, low_rank, swiglu):
    """`_grouped_experts` for few pairs: every pair multiplies by its own expert's gathered weights."""
    ids = jnp.minimum(experts, b_gate_up.shape[0] - 1)  # pairs handled elsewhere have weight 0

    def gathered(weight):
        return _dense(jax.tree.map(lambda leaf: leaf[ids], weight), tokens.dtype)  # [N, k, ...]

    def update(name, x):
        if name not in low_rank:
            return 0.0
        a, b, scaling = low_rank[name]
        inner = jnp.einsum("nki,nkir->nkr", x, a[ids].astype(x.dtype))
        return jnp.einsum("nkr,nkro->nko", inner, b[ids].astype(x.dtype), preferred_element_type=jnp.float32) * scaling

    rows = jnp.broadcast_to(tokens[:, None], (*ids.shape, tokens.shape[-1]))
    h = jnp.einsum("nki,nkio->nko", rows, gathered(w_gate_up), preferred_element_type=jnp.float32)
    h = clamped_swiglu(h + update("w_gate_up", rows) + b_gate_up[ids], **swiglu).astype(tokens.dtype)
    out = jnp.einsum("nki,nkio->nko", h, gathered(w_down), preferred_element_type=jnp.float32) + update("w_down", h)
    out = (out + b_down[ids]) * weights[..., None]
    return out.sum(axis=1).astype(tokens.dtype)


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

    def __call__(self, x, cos, sin, mask, key=None, attend_to=None):
        """-> (output, router losses, keys, values) — see Attention for `attend_to`."""
        attended, keys, values = self.attn(self.attn_norm(x), cos, sin, mask, key, attend_to)
        x = x + attended
        out, router = self.mlp(self.mlp_norm(x))
        return x + out, router, keys, values


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
        self.mesh = None  # the mesh the parameters are placed on (sharding.shard_model)

    def use_mesh(self, mesh, rules=None) -> None:
        """Records the mesh the parameters live on; the MoE layers then run expert-parallel over its expert axis."""
        self.mesh = mesh
        for stack in (self.banded_blocks, self.full_blocks):
            stack.mlp.mesh = mesh

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
        masks = (SegmentMask(segment_ids, self.config.sliding_window), SegmentMask(segment_ids, None))
        keys = None if dropout_key is None else jax.random.split(dropout_key, self.config.num_hidden_layers)

        def layer(mask):
            def step(block, x, key):
                x, router, _, _ = block(x, cos, sin, mask, key)
                return x, router
            return step

        x, (banded, full) = self._run_layers(self.embedding[...][tokens], layer(masks[0]), layer(masks[1]),
                                             _split_layers(keys), remat=remat)
        return self.norm(x), (banded.sum(axis=0) + full.sum(axis=0)) / self.config.num_hidden_layers

    def _run_layers(self, x, banded_step, full_step, inputs=(None, None), remat: str = "none"):
        """Runs layers 0, 1, 2, ... (banded, full, banded, ...), scanning over (banded, full) pairs.

        `*_step(block, x, layer_input) -> (x, layer_output)`; `inputs` are the (banded, full) per-layer inputs
        with a leading layer axis (or None), and the result is (x, (banded outputs, full outputs)) likewise.
        """
        banded_def, banded_layers = nnx.split(self.banded_blocks)
        full_def, full_layers = nnx.split(self.full_blocks)
        banded_inputs, full_inputs = inputs
        pairs = self.config.num_full_layers

        def pair(x, layer):
            (banded, banded_input), (full, full_input) = layer
            x, banded_output = banded_step(nnx.merge(banded_def, banded), x, banded_input)
            x, full_output = full_step(nnx.merge(full_def, full), x, full_input)
            return x, (banded_output, full_output)

        if remat != "none":
            pair = jax.checkpoint(pair, policy=_REMAT_POLICIES[remat])
        first = slice(0, pairs)
        x, (banded_outputs, full_outputs) = jax.lax.scan(
            pair, x, ((_layers(banded_layers, first), _layers(banded_inputs, first)), (full_layers, full_inputs)))
        if self.config.num_banded_layers > pairs:  # an odd layer count ends on a banded layer
            last = nnx.merge(banded_def, _layers(banded_layers, -1))
            x, last_output = banded_step(last, x, _layers(banded_inputs, -1))
            banded_outputs = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), banded_outputs, last_output)
        return x, (banded_outputs, full_outputs)

    # ---- generation with a KV cache ----------------------------------------------------------------------

    def init_cache(self, start: jax.Array, max_length: int) -> KVCache:
        """An empty cache for a batch of left-padded sequences whose real tokens begin at `start` [B]."""
        c, batch = self.config, start.shape[0]
        heads = (batch, c.num_key_value_heads, c.head_dim)

        def zeros(layers, slots):
            return jnp.zeros((layers, heads[0], slots, *heads[1:]), self.dtype)

        window = min(c.sliding_window, max_length)
        return KVCache(zeros(c.num_banded_layers, window), zeros(c.num_banded_layers, window),
                       zeros(c.num_full_layers, max_length), zeros(c.num_full_layers, max_length),
                       jnp.asarray(start, jnp.int32), jnp.zeros(batch, jnp.int32))

    def prefill(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Runs left-padded prompts [B, T] (real tokens from `cache.start`) into an empty cache; returns the logits
        of the last position [B, V] and the cache holding positions 0..T-1."""
        length = tokens.shape[1]
        index = jnp.arange(length)
        real = (index[None, :] >= cache.start[:, None]).astype(jnp.int32)  # pads are their own segment
        positions = jnp.maximum(index[None, :] - cache.start[:, None], 0)
        cos, sin = rope_cos_sin(self.config, positions)
        window = cache.banded_k.shape[2]
        # Ring slot s keeps the latest index congruent to s (mod window); slots never written stay zero.
        ring_index = (length - 1) - ((length - 1 - jnp.arange(window)) % window)
        ring_written = (ring_index >= 0)[None, :, None, None]

        def banded(block, x, _):
            x, _, k, v = block(x, cos, sin, SegmentMask(real, self.config.sliding_window))
            ring = [jnp.where(ring_written, a[:, jnp.maximum(ring_index, 0)], 0) for a in (k, v)]
            return x, tuple(ring)

        def full(block, x, _):
            x, _, k, v = block(x, cos, sin, SegmentMask(real, None))
            pad = ((0, 0), (0, cache.full_k.shape[2] - length), (0, 0), (0, 0))
            return x, (jnp.pad(k, pad), jnp.pad(v, pad))

        x, ((banded_k, banded_v), (full_k, full_v)) = self._run_layers(self.embedding[...][tokens], banded, full)
        cache = KVCache(banded_k, banded_v, full_k, full_v, cache.start, jnp.full_like(cache.start, length))
        return self.logits(self.norm(x[:, -1])), cache

    def decode(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One new token per row [B], row b at index `cache.length[b]`; returns its logits [B, V] and the cache."""
        index, start = cache.length, cache.start
        window, capacity = cache.banded_k.shape[2], cache.full_k.shape[2]
        cos, sin = rope_cos_sin(self.config, (index - start)[:, None])
        slots = jnp.arange(window)
        # the index each ring slot holds once this step's is written
        ring_index = index[:, None] - ((index[:, None] - slots) % window)
        banded_mask = (ring_index >= start[:, None])[:, None, :]
        positions = jnp.arange(capacity)[None, :]
        full_mask = ((positions >= start[:, None]) & (positions <= index[:, None]))[:, None, :]
        rows = jnp.arange(index.shape[0])

        def writer(cache_k, cache_v, slot):
            def attend_to(k, v):
                return cache_k.at[rows, slot].set(k[:, 0]), cache_v.at[rows, slot].set(v[:, 0])
            return attend_to

        def banded(block, x, kv):
            x, _, k, v = block(x, cos, sin, banded_mask, attend_to=writer(*kv, index % window))
            return x, (k, v)

        def full(block, x, kv):
            x, _, k, v = block(x, cos, sin, full_mask, attend_to=writer(*kv, index))
            return x, (k, v)

        x = self.embedding[...][tokens][:, None]
        x, ((banded_k, banded_v), (full_k, full_v)) = self._run_layers(
            x, banded, full, ((cache.banded_k, cache.banded_v), (cache.full_k, cache.full_v)))
        cache = KVCache(banded_k, banded_v, full_k, full_v, start, index + 1)
        return self.logits(self.norm(x[:, 0])), cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of the tokens seen so far. Banded layers keep a ring of `sliding_window` slots (index i
    in slot i % window), full layers every index up to the capacity. Row b's real tokens start at index
    `start[b]` (prompts are left-padded) and `length[b]` indices have been written; rows are independent, so a
    server can refill one while the others decode."""

    banded_k: jax.Array  # [banded layers, B, window, K, H]
    banded_v: jax.Array
    full_k: jax.Array  # [full layers, B, capacity, K, H]
    full_v: jax.Array
    start: jax.Array  # [B] int32
    length: jax.Array  # [B] int32

    @property
    def capacity(self) -> int:
        return self.full_k.shape[2]


_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _split_layers(per_layer):
    """Per-layer inputs [L, ...] (layer 0, 1, 2, ...) -> (banded layers' [0, 2, ...], full layers' [1, 3, ...])."""
    return (None, None) if per_layer is None else (per_layer[0::2], per_layer[1::2])


def _layers(stacked, index):
    return None if stacked is None else jax.tree.map(lambda leaf: leaf[index], stacked)


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
