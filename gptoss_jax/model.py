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

The products themselves — matmuls, attention, SwiGLU, the experts' grouped matmul — are `gptoss_jax.ops`; how the
experts run (grouped, gathered, the Pallas kernel, expert-parallel, in token tiles) is `gptoss_jax.moe`; this file
composes them, and routes attention through the Pallas kernels (`gptoss_jax.kernels`) when asked to.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from gptoss_jax import backend, moe, ops, sharding
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kernels.attention import decode_attention, flash_attention
from gptoss_jax.mxfp4 import Mxfp4Layer, Mxfp4Weight, fake_quantize, is_packed
from gptoss_jax.ops import SegmentMask

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

    def __init__(self, a: LoRAParam, b: LoRAParam, *, inputs: int, scaling: float, dropout: float = 0.0,
                 outputs_first: bool = False):
        self.a, self.b = a, b
        self.inputs = inputs  # how many of the weight's axes are inputs (2 for wo: heads, head_dim)
        self.outputs_first = outputs_first  # the weight lays its output axes before its inputs (attention, router)
        self.scaling, self.dropout = scaling, dropout

    def __call__(self, x: jax.Array, into_rank: str, out_of_rank: str, key: jax.Array | None = None) -> jax.Array:
        if self.dropout and key is not None:
            keep = jax.random.bernoulli(key, 1 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1 - self.dropout), 0).astype(x.dtype)
        low = ops.matmul(into_rank, x, self.a[...].astype(x.dtype))
        return ops.matmul(out_of_rank, low, self.b[...].astype(x.dtype)) * self.scaling

    def delta(self) -> jax.Array:
        """The dense update of the weight in its layout, scaling * a @ b (transposed for an outputs-first weight),
        batched over the leading (layer, expert) axes."""
        a, b = self.a[...], self.b[...]
        lead = a.ndim - self.inputs - 1
        product = a.reshape(*a.shape[:lead], -1, a.shape[-1]) @ b.reshape(*b.shape[: lead + 1], -1)
        inputs, outputs = a.shape[lead:-1], b.shape[lead + 1 :]
        if self.outputs_first:
            return jnp.swapaxes(product, -1, -2).reshape(*a.shape[:lead], *outputs, *inputs) * self.scaling
        return product.reshape(*a.shape[:lead], *inputs, *outputs) * self.scaling


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


def attend(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, mask: SegmentMask | jax.Array,
           kernels: str = "xla", block: int = 128) -> jax.Array:
    """Attention with sinks over a segment mask (a step's own keys) or a dense mask (one query against a cache):
    the Pallas kernels when `kernels` asks for them (flash attention, decode attention); otherwise the blockwise
    path for sequences longer than `block`, and the dense one for the rest (where the two are the same work)."""
    kernel = backend.use_kernels(kernels)
    if isinstance(mask, SegmentMask):
        if kernel and q.shape[1] == k.shape[1]:
            log.info("attention: Pallas flash attention%s", backend.interpret_note())
            return flash_attention(q, k, v, sinks, mask.segment_ids, window=mask.window, interpret=not backend.on_gpu())
        if q.shape[1] == k.shape[1] > block:
            return ops.blockwise_attention(q, k, v, sinks, mask.segment_ids, window=mask.window, block=block)
        mask = ops.attention_mask(mask.segment_ids, mask.window)
    elif kernel and q.shape[1] == 1:
        log.info("attention: Pallas decode attention%s", backend.interpret_note())
        return decode_attention(q, k, v, sinks, mask[:, 0], interpret=not backend.on_gpu())
    return ops.attention_with_sinks(q, k, v, sinks, mask)


class Attention(nnx.Module):
    def __init__(self, config: GptOssConfig, *, dtype, rngs: nnx.Rngs):
        d, n, k, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        # Weights outputs-major, as the checkpoints store them: XLA's CPU product of a few rows reads a weight laid
        # [outputs, inputs] 2-3x faster than one laid [inputs, outputs] (gpt-oss-20b's bfloat16 q projection of
        # two rows: 1.2 against 3.6 ms); prefill and training products run at the same speed either way.
        self.wq = _param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), dtype)
        self.bq = _param(rngs, (n, h), ("q_heads", "head_dim"), dtype, _zeros)
        self.wk = _param(rngs, (k, h, d), ("kv_heads", "head_dim", "embed"), dtype)
        self.bk = _param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, _zeros)
        self.wv = _param(rngs, (k, h, d), ("kv_heads", "head_dim", "embed"), dtype)
        self.bv = _param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, _zeros)
        self.wo = _param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), dtype)
        self.bo = _param(rngs, (d,), ("embed",), dtype, _zeros)
        self.sinks = _param(rngs, (n,), ("q_heads",), jnp.float32)
        self.kernels, self.block = config.kernels, config.attention_block
        self.adapters = nnx.Dict()  # LoRA of wq, wk, wv, wo

    def __call__(self, x, cos, sin, mask, key=None, attend_to=None) -> tuple[jax.Array, Any]:
        """-> (output, kept). `attend_to(k, v) -> ((keys, values), kept)` gives the keys and values to attend
        over (a KV cache updated with this step's) and what the caller keeps of them (the updated cache); by
        default the step's own keys and values, kept as they are."""
        a = self.adapters
        q = _project(x, self.wq[...]) + self.bq[...]
        q += _low_rank(a, "wq", x, "btd,dr->btr", "btr,rnh->btnh", _key(key, 0))
        k = _project(x, self.wk[...]) + self.bk[...]
        k += _low_rank(a, "wk", x, "btd,dr->btr", "btr,rkh->btkh", _key(key, 1))
        v = _project(x, self.wv[...]) + self.bv[...]
        v += _low_rank(a, "wv", x, "btd,dr->btr", "btr,rkh->btkh", _key(key, 2))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        (keys, values), kept = ((k, v), (k, v)) if attend_to is None else attend_to(k, v)
        out = checkpoint_name(attend(q, keys, values, self.sinks[...], mask, self.kernels, self.block), "attention")
        wo = self.wo[...]  # viewed two-dimensional with the heads flattened, as in `_project` (the same copy)
        projected = ops.matmul("btf,df->btd", out.reshape(*out.shape[:2], -1), wo.reshape(wo.shape[0], -1))
        projected += self.bo[...]
        return projected + _low_rank(a, "wo", out, "btnh,nhr->btr", "btr,rd->btd", _key(key, 3)), kept


def _project(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [B, T, D] times w [heads, head_dim, D] -> [B, T, heads, head_dim]. Written over the weight's two-dimensional
    view, with heads flattened: over the 3-D weight XLA's CPU backend transposes the weight to inputs-major before
    the product, at every call (gpt-oss-20b: a copy of every attention weight a decoded token)."""
    heads, head_dim, dim = w.shape
    return ops.matmul("btd,fd->btf", x, w.reshape(heads * head_dim, dim)).reshape(*x.shape[:2], heads, head_dim)


# ---- mixture of experts ------------------------------------------------------------------------------------


class MoE(nnx.Module):
    def __init__(self, config: GptOssConfig, *, dtype, mxfp4_experts: bool = False, rngs: nnx.Rngs):
        d, e, f = config.hidden_size, config.num_experts, config.intermediate_size
        self.router_w = _param(rngs, (e, d), ("experts", "embed"), dtype)  # outputs-major, as the checkpoints
        self.router_b = _param(rngs, (e,), ("experts",), dtype)
        # Columns of the first projection interleave gate and linear units (see `ops.clamped_swiglu`).
        self.w_gate_up = _expert_param(rngs, (e, d, 2 * f), ("experts", "embed", "mlp"), dtype, mxfp4_experts)
        self.b_gate_up = _param(rngs, (e, 2 * f), ("experts", "mlp"), dtype, _zeros)
        self.w_down = _expert_param(rngs, (e, f, d), ("experts", "mlp", "embed"), dtype, mxfp4_experts)
        self.b_down = _param(rngs, (e, d), ("experts", "embed"), dtype, _zeros)
        self.experts_per_token = config.experts_per_token
        self.swiglu = dict(alpha=config.swiglu_alpha, limit=config.swiglu_limit)
        self.kernels, self.tile, self.qat = config.kernels, config.moe_tile, config.qat
        self.dtype = jnp.dtype(dtype)
        self.adapters = nnx.Dict()  # LoRA of router_w, w_gate_up, w_down
        self.mesh = None  # set by sharding.shard_model: with an expert axis, the experts run expert-parallel

    def expert_weights(self, dtype) -> tuple[jax.Array, jax.Array]:
        """The gate-up [E, D, 2F] and down [E, F, D] weights, dense: MXFP4 ones are dequantized at every use."""
        return tuple(moe.dense(param.get_value(), dtype) for param in (self.w_gate_up, self.w_down))

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [N, D] -> (weights [N, k] summing to 1, expert ids [N, k], router logits [N, E]), in float32."""
        x = x.astype(jnp.float32)
        logits = x @ self.router_w[...].astype(jnp.float32).T + self.router_b[...].astype(jnp.float32)
        logits += _low_rank(self.adapters, "router_w", x, "nd,dr->nr", "nr,re->ne")
        top_logits, experts = jax.lax.top_k(logits, self.experts_per_token)
        return checkpoint_name((jax.nn.softmax(top_logits, axis=-1), experts), "routing") + (logits,)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (output, [router z-loss, load-balancing loss]) — the auxiliary losses fine-tuning may add."""
        batch, length, dim = x.shape
        tokens = x.reshape(batch * length, dim)
        with jax.named_scope("router"):
            weights, experts, logits = self.route(tokens)
        with jax.named_scope("experts"):
            out = moe.in_tiles(self._experts, self.tile, tokens, weights, experts, self.b_gate_up.shape[0])
        return out.reshape(batch, length, dim), moe.router_losses(logits, experts)

    def _experts(self, tokens: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
        if self.mesh is not None and self.mesh.shape["expert"] > 1:
            w_gate_up, w_down, low_rank = self._weights_for_experts()
            return moe.expert_parallel(self.mesh, tokens, weights, experts, w_gate_up, self.b_gate_up[...], w_down,
                                       self.b_down[...], low_rank, self.swiglu, self.kernels)
        return self.grouped_experts(tokens, weights, experts)

    def grouped_experts(self, tokens: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
        """All experts here: each expert's (token, expert) pairs are one group of a ragged matmul."""
        w_gate_up, w_down, low_rank = self._weights_for_experts()
        return moe.run_experts(tokens, weights, experts, w_gate_up, self.b_gate_up[...], w_down, self.b_down[...],
                               low_rank, self.swiglu, self.kernels)

    def _weights_for_experts(self):
        """(gate-up weight, down weight, their adapters' factors) as the experts multiply by them. With QAT
        (`GptOssConfig.qat`) each weight is the one an MXFP4 export writes — its adapter's update merged as
        `lora.merge_lora` merges it, then through `mxfp4.fake_quantize` — and no adapter is left beside it. Packed
        weights without expert adapters are exported as they are (merge_lora keeps them packed): used as they are."""
        names = ("w_gate_up", "w_down")
        as_exported = is_packed(self.w_gate_up.get_value()) and not any(name in self.adapters for name in names)
        if not self.qat or as_exported:
            low_rank = {name: (adapter.a[...], adapter.b[...], adapter.scaling)
                        for name, adapter in self.adapters.items() if name in names}
            return self.w_gate_up.get_value(), self.w_down.get_value(), low_rank
        exported = []
        for name in names:
            weight = moe.dense(getattr(self, name).get_value(), jnp.float32)
            if name in self.adapters:
                weight = (weight + self.adapters[name].delta()).astype(self.dtype)
            exported.append(fake_quantize(weight).astype(self.dtype))
        return *exported, {}

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
            h = ops.clamped_swiglu(h, **self.swiglu) @ w_down[e] + self.b_down[e]
            out += token_weight * h
        return out.astype(tokens.dtype)


def _expert_param(rngs: nnx.Rngs, shape, axes, dtype, mxfp4: bool) -> nnx.Param:
    value = _normal(rngs.params(), shape, dtype)
    return nnx.Param(Mxfp4Weight.quantize(value) if mxfp4 else value, axes=axes)


# ---- transformer block and model ---------------------------------------------------------------------------


class Block(nnx.Module):
    def __init__(self, config: GptOssConfig, *, dtype, mxfp4_experts: bool, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config, rngs=rngs)
        self.attn = Attention(config, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(config, rngs=rngs)
        self.mlp = MoE(config, dtype=dtype, mxfp4_experts=mxfp4_experts, rngs=rngs)

    def __call__(self, x, cos, sin, mask, key=None, attend_to=None):
        """-> (output, router losses, kept) — see Attention for `attend_to` and `kept`. Named scopes
        (`attention`, `moe`; inside it `router` and `experts`) name the parts in profiles and dumped HLO."""
        with jax.named_scope("attention"):
            attended, kept = self.attn(self.attn_norm(x), cos, sin, mask, key, attend_to)
        x = x + attended
        with jax.named_scope("moe"):
            out, router = self.mlp(self.mlp_norm(x))
        return x + out, router, kept


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
        return ops.matmul("...d,vd->...v", hidden, self.unembedding[...])

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
        "full" (keep only each layer's input), "dots" (keep matmul outputs, recompute the rest) or
        "attention" (keep the attention's results and the routing, recompute the rest).
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
                x, router, _ = block(x, cos, sin, mask, key)
                return x, router
            return step

        x, (banded, full) = self._run_layers(self.embedding[...][tokens], layer(masks[0]), layer(masks[1]),
                                             _split_layers(keys), remat=remat)
        return self.norm(x), (banded.sum(axis=0) + full.sum(axis=0)) / self.config.num_hidden_layers

    def _run_layers(self, x, banded_step, full_step, inputs=(None, None), remat: str = "none", unroll: bool = False):
        """Runs layers 0, 1, 2, ... (banded, full, banded, ...), scanning over (banded, full) pairs.

        `*_step(block, x, layer_input) -> (x, layer_output)`; `inputs` are the (banded, full) per-layer inputs
        with a leading layer axis (or None), and the result is (x, (banded outputs, full outputs)) likewise.
        unroll: run the layers one after another in a Python loop (see `_unroll_inference`); their parameters may
            then be `LayerArrays` (see `split_for_inference`).
        """
        banded_def, banded_layers = nnx.split(self.banded_blocks)
        full_def, full_layers = nnx.split(self.full_blocks)
        banded_inputs, full_inputs = inputs
        pairs = self.config.num_full_layers

        def layer_call(step, graphdef, kind):  # with remat, each layer is replayed on its own in the backward pass
            def call(params, x, layer_input):
                if remat == "offload":  # the layer's input is what the backward keeps, in host memory
                    x = checkpoint_name(x, "layer_input")
                with jax.named_scope(f"{kind}_layer"):
                    return step(nnx.merge(graphdef, params), x, layer_input)
            return call if remat == "none" else jax.checkpoint(call, policy=_REMAT_POLICIES[remat])

        banded_call = layer_call(banded_step, banded_def, "banded")
        full_call = layer_call(full_step, full_def, "full")
        if unroll or _holds_layer_arrays(banded_layers):  # layer by layer (a scan needs stacks)
            kinds = ((banded_call, banded_layers, _bfloat16_bits(banded_layers), banded_inputs),
                     (full_call, full_layers, _bfloat16_bits(full_layers), full_inputs))
            outputs = ([], [])
            for number in range(self.config.num_hidden_layers):
                call, stacked, bits, layer_inputs = kinds[number % 2]
                weights = _bfloat16_bits(_layers(bits, number // 2), back=True)  # (see _bfloat16_bits)
                x, output = call(_in_place(weights, stacked, number // 2), x, _layers(layer_inputs, number // 2))
                outputs[number % 2].append(output)
            return x, tuple(jax.tree.map(lambda *layers: jnp.stack(layers), *kind) for kind in outputs)

        def pair(x, layer):
            index, (banded, banded_input), (full, full_input) = layer
            x, banded_output = banded_call(_in_place(banded, banded_layers, index), x, banded_input)
            x, full_output = full_call(_in_place(full, full_layers, index), x, full_input)
            return x, (banded_output, full_output)

        first = slice(0, pairs)
        x, (banded_outputs, full_outputs) = jax.lax.scan(
            pair, x, (jnp.arange(pairs), (_layers(banded_layers, first), _layers(banded_inputs, first)),
                      (full_layers, full_inputs)))
        if self.config.num_banded_layers > pairs:  # an odd layer count ends on a banded layer
            last = _in_place(_layers(banded_layers, pairs), banded_layers, pairs)
            x, last_output = banded_call(last, x, _layers(banded_inputs, -1))
            banded_outputs = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), banded_outputs, last_output)
        return x, (banded_outputs, full_outputs)

    # ---- generation with a KV cache ----------------------------------------------------------------------

    def init_cache(self, start: jax.Array, max_length: int) -> KVCache:
        """An empty cache for a batch of left-padded sequences whose real tokens begin at `start` [B]."""
        c, batch = self.config, start.shape[0]

        def zeros(layers, slots):
            return jnp.zeros((layers, batch, c.num_key_value_heads, slots, c.head_dim), self.dtype)

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
        window = cache.window
        # Ring slot s keeps the latest index congruent to s (mod window); slots never written stay zero.
        ring_index = (length - 1) - ((length - 1 - jnp.arange(window)) % window)
        ring_written = (ring_index >= 0)[None, :, None, None]

        def banded(block, x, _):
            x, _, (k, v) = block(x, cos, sin, SegmentMask(real, self.config.sliding_window))
            ring = [jnp.where(ring_written, a[:, jnp.maximum(ring_index, 0)], 0) for a in (k, v)]
            return x, tuple(_heads_first(a) for a in ring)

        def full(block, x, _):
            x, _, (k, v) = block(x, cos, sin, SegmentMask(real, None))
            pad = ((0, 0), (0, cache.capacity - length), (0, 0), (0, 0))
            return x, (_heads_first(jnp.pad(k, pad)), _heads_first(jnp.pad(v, pad)))

        x, ((banded_k, banded_v), (full_k, full_v)) = self._run_layers(self.embedding[...][tokens], banded, full,
                                                                       unroll=_unroll_inference(self))
        cache = KVCache(banded_k, banded_v, full_k, full_v, cache.start, jnp.full_like(cache.start, length))
        return self.logits(self.norm(x[:, -1])), cache

    def extend(self, tokens: jax.Array, count: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Appends a chunk to each row of a cache: row b's first `count[b]` tokens of `tokens` [B, T] (the rest is
        padding) at indices `cache.length[b]` on. Returns the logits after each row's last real token [B, V] and
        the cache, as if the whole sequence had been prefilled — without prefilling it again (a conversation that
        goes on after a tool's answer). Every row needs count >= 1."""
        index, start = cache.length, cache.start
        window, capacity, chunk = cache.window, cache.capacity, tokens.shape[1]
        offsets = jnp.arange(chunk)
        at = index[:, None] + offsets[None, :]  # [B, T] the chunk's indices
        cos, sin = rope_cos_sin(self.config, at - start[:, None])
        rows = jnp.arange(index.shape[0])[:, None]
        # Banded layers attend over the ring as it was (slot s: the latest index before the chunk congruent to s)
        # and the chunk itself; the ring is written afterwards, since the chunk's own keys would overwrite ones
        # its earlier queries still see.
        slots = jnp.arange(window)
        ring_index = (index[:, None] - 1) - ((index[:, None] - 1 - slots) % window)  # [B, W]
        ring_seen = ((ring_index[:, None, :] >= start[:, None, None])
                     & (at[:, :, None] - ring_index[:, None, :] < window))  # [B, T, W]
        chunk_seen = (offsets[None, :] <= offsets[:, None]) & (offsets[:, None] - offsets[None, :] < window)
        banded_mask = jnp.concatenate([ring_seen, jnp.broadcast_to(chunk_seen, (index.shape[0], chunk, chunk))], 2)
        # the chunk offset each ring slot takes: the latest real one congruent to it, if any
        taken = (count[:, None] - 1) - ((index[:, None] + count[:, None] - 1 - slots) % window)  # [B, W]
        full_mask = ((jnp.arange(capacity)[None, None, :] >= start[:, None, None])
                     & (jnp.arange(capacity)[None, None, :] <= at[:, :, None]))  # [B, T, C]

        def banded(block, carry, layer):
            x, ((ring_k, ring_v), full) = carry

            def ring_then_chunk(k, v):
                both = (jnp.concatenate([_heads_first(ring_k[layer]), k], 1),
                        jnp.concatenate([_heads_first(ring_v[layer]), v], 1))
                return both, both

            x, _, (k, v) = block(x, cos, sin, banded_mask, attend_to=ring_then_chunk)
            written = (taken >= 0)[:, None, :, None]
            ring = tuple(stack.at[layer].set(jnp.where(
                written, _heads_first(both[:, window:][rows, jnp.maximum(taken, 0)]), stack[layer]))
                for stack, both in ((ring_k, k), (ring_v, v)))
            return (x, (ring, full)), None

        def full(block, carry, layer):
            # padding past a row's count is written too, past its new length: masked until decoding overwrites it
            # (indices past the capacity are dropped)
            x, (ring, (full_k, full_v)) = carry
            x, _, full = block(x, cos, sin, full_mask, attend_to=lambda k, v: _written(
                full_k, full_v, layer, (rows, at), k, v))
            return (x, (ring, full)), None

        (x, cache_stacks), _ = self._run_layers((self.embedding[...][tokens], _stacks(cache)), banded, full,
                                                self._layer_indices(), unroll=_unroll_inference(self))
        last = x[jnp.arange(index.shape[0]), count - 1]
        return self.logits(self.norm(last)), KVCache(*cache_stacks[0], *cache_stacks[1], start, index + count)

    def decode(self, tokens: jax.Array, cache: KVCache, live: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """One new token per row [B], row b at index `cache.length[b]`; returns its logits [B, V] and the cache.
        live [B] bool: rows whose token is written (the others' caches stay as they are, to be extended later).

        The cache is carried through the layer loop and each layer writes its one new position into it in place
        (the cache is donated): a step reads each layer's cache once, for attention, and copies no stack of it
        (a bfloat16 cache on a CPU aside: see `_scatter`)."""
        index, start = cache.length, cache.start
        window, capacity = cache.window, cache.capacity
        cos, sin = rope_cos_sin(self.config, (index - start)[:, None])
        slots = jnp.arange(window)
        # the index each ring slot holds once this step's is written
        ring_index = index[:, None] - ((index[:, None] - slots) % window)
        banded_mask = (ring_index >= start[:, None])[:, None, :]
        positions = jnp.arange(capacity)[None, :]
        full_mask = ((positions >= start[:, None]) & (positions <= index[:, None]))[:, None, :]
        rows = jnp.arange(index.shape[0])

        def attend_to(stack_k, stack_v, layer, slot):
            def write(k, v):
                if live is not None:  # rows that are not live write back what their slot holds
                    k, v = (jnp.where(live[:, None, None], new[:, 0], old[layer, rows, :, slot])[:, None]
                            for new, old in ((k, stack_k), (v, stack_v)))
                return _written(stack_k, stack_v, layer, (rows, slot), k[:, 0], v[:, 0])
            return write

        def banded(block, carry, layer):
            x, (ring, full) = carry
            x, _, ring = block(x, cos, sin, banded_mask, attend_to=attend_to(*ring, layer, index % window))
            return (x, (ring, full)), None

        def full(block, carry, layer):
            x, (ring, full) = carry
            x, _, full = block(x, cos, sin, full_mask, attend_to=attend_to(*full, layer, index))
            return (x, (ring, full)), None

        (x, cache_stacks), _ = self._run_layers((self.embedding[...][tokens][:, None], _stacks(cache)), banded,
                                                full, self._layer_indices(), unroll=_unroll_inference(self))
        cache = KVCache(*cache_stacks[0], *cache_stacks[1], start, index + (1 if live is None else live))
        return self.logits(self.norm(x[:, 0])), cache

    def _layer_indices(self) -> tuple[jax.Array, jax.Array]:
        """Each layer's index in its own stack (banded, full), as `_run_layers` inputs."""
        return jnp.arange(self.config.num_banded_layers), jnp.arange(self.config.num_full_layers)


def _stacks(cache: KVCache):
    """The cache's ((banded keys, values), (full keys, values)) stacks, carried through the layer loop."""
    return (cache.banded_k, cache.banded_v), (cache.full_k, cache.full_v)


def _written(stack_k, stack_v, layer, where, k, v):
    """An `attend_to` result: the step's keys and values [..., K, H] written into layer `layer` of the stacked
    cache at `where` (row and slot indices; out of range: dropped); attends over that layer, keeps the stacks."""
    stack_k, stack_v = (_scatter(stack, (layer, where[0], slice(None), where[1]), new)
                        for stack, new in ((stack_k, k), (stack_v, v)))
    return (_heads_first(stack_k[layer]), _heads_first(stack_v[layer])), (stack_k, stack_v)


def _scatter(stack: jax.Array, index, new: jax.Array) -> jax.Array:
    """stack.at[index].set(new) (out of range: dropped); on a CPU through an integer view of a bfloat16 stack: XLA's
    CPU backend scatters bfloat16 in float32, converting the whole stack there and back at every step, where the
    view costs one copy at bfloat16's width (a decode step of 16 rows at 4,096 slots: 153 ms, not 191)."""
    if stack.dtype != jnp.bfloat16 or backend.on_gpu():
        return stack.at[index].set(new.astype(stack.dtype), mode="drop")
    written = _bfloat16_bits(stack).at[index].set(_bfloat16_bits(new.astype(stack.dtype)), mode="drop")
    return _bfloat16_bits(written, back=True)


def _heads_first(array: jax.Array) -> jax.Array:
    """[B, S, K, H] <-> [B, K, S, H]: the cache keeps key/value heads before positions (the layout attention reads:
    a per-head matrix of positions x head_dim), the model computes them the other way round."""
    return jnp.swapaxes(array, 1, 2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of the tokens seen so far. Banded layers keep a ring of `sliding_window` slots (index i
    in slot i % window), full layers every index up to the capacity. Row b's real tokens start at index
    `start[b]` (prompts are left-padded) and `length[b]` indices have been written; rows are independent, so a
    server can refill one while the others decode. Key/value heads come before slots: the layout attention reads
    (in another, XLA would transpose the whole cache at every decoding step)."""

    banded_k: jax.Array  # [banded layers, B, K, window, H]
    banded_v: jax.Array
    full_k: jax.Array  # [full layers, B, K, capacity, H]
    full_v: jax.Array
    start: jax.Array  # [B] int32
    length: jax.Array  # [B] int32

    SLOTS = 3  # the slot axis of the key/value stacks

    @property
    def capacity(self) -> int:
        return self.full_k.shape[self.SLOTS]

    @property
    def window(self) -> int:
        return self.banded_k.shape[self.SLOTS]


# What the backward pass keeps of each layer's forward (the rest is recomputed from the layer's input):
# "full" nothing; "dots" every matmul output; "attention" the attention's results (its output and softmax
# statistics, named in `Attention` and `ops.blockwise_attention`) and the routing decisions, which are small and
# whose recomputation (the causal T x T work of full-attention layers) is the costly part of a layer's replay.
_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                   "attention": jax.checkpoint_policies.save_only_these_names("attention", "routing"),
                   "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
                       names_which_can_be_saved=(), names_which_can_be_offloaded=("layer_input",),
                       offload_src="device", offload_dst="pinned_host")}


def _unroll_inference(model: GptOss) -> bool:
    """Whether prefill and decode unroll their layer loop: on a CPU, for bfloat16 models of more than one layer.
    XLA's CPU backend copies every bfloat16 array a loop reads to float32 before the loop — for inference, the
    whole stack of attention weights at every decoding step (gpt-oss-20b: 2.5 GB written a token, and as much
    memory). Unrolled, each layer reads its own bf16 weights. (Training keeps the loop: its steps are long, and
    compile time would grow.)"""
    return backend.platform() == "cpu" and model.dtype == jnp.bfloat16 and model.config.num_hidden_layers > 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerArrays:
    """A parameter stack [layers, ...] held as one array per layer: `stack[i]` is layer i's array, no slice."""

    layers: tuple[jax.Array, ...]

    def __getitem__(self, index: int) -> jax.Array:
        return self.layers[index]


def _holds_layer_arrays(tree) -> bool:
    return any(isinstance(leaf, LayerArrays) for leaf in jax.tree.leaves(
        tree, is_leaf=lambda leaf: isinstance(leaf, LayerArrays)))


def split_for_inference(model: GptOss) -> tuple[nnx.GraphDef, nnx.State]:
    """`nnx.split(model)` for prefill, decode and extend. Where they unroll the layer loop (`_unroll_inference`),
    each float parameter stack of the blocks becomes `LayerArrays` viewing the stack's memory: a layer's products
    then read its weights where they lie, where a slice of a stack is a copy (XLA makes operands into buffers) —
    gpt-oss-20b on a 2-core Intel Xeon: 0.7 s of a 1.15 s decode step copying attention weights out of their
    stacks. A stack that lives on several devices, or whose layers jax would copy, stays as it is."""
    graphdef, state = nnx.split(model)
    if not _unroll_inference(model):
        return graphdef, state

    def split(stack):
        if not isinstance(stack, jax.Array) or len(stack.sharding.device_set) > 1 or not stack.is_fully_addressable:
            return stack  # (MXFP4 experts: the loop reads them in place, see `_in_place`)
        where = sharding.layer_sharding(stack.sharding)
        host = np.asarray(stack)  # on a CPU, the array's own memory
        layers = []
        for i in range(stack.shape[0]):
            layers.append(jax.device_put(host[i], where))
            if layers[i].unsafe_buffer_pointer() != stack.unsafe_buffer_pointer() + i * layers[i].nbytes:
                return stack  # a copy (the layer not aligned as jax needs to view it): no memory to spare
        return LayerArrays(tuple(layers))

    for blocks in ("banded_blocks", "full_blocks"):
        state[blocks] = jax.tree.map(split, state[blocks], is_leaf=lambda leaf: isinstance(leaf, Mxfp4Weight))
    return graphdef, state


def _bfloat16_bits(tree, back: bool = False):
    """A tree's bfloat16 arrays viewed as uint16 (`back`: uint16 as bfloat16 again). The unrolled layer loop slices
    each layer's weights out of their stacks through this view: XLA's CPU backend slices a bfloat16 array by
    converting it to float32 and back (gpt-oss-20b: a copy of every attention weight a step at ~3 GB/s), an
    integer one by copying its bytes."""
    source, target = (jnp.uint16, jnp.bfloat16) if back else (jnp.bfloat16, jnp.uint16)
    return jax.tree.map(lambda a: jax.lax.bitcast_convert_type(a, target) if a.dtype == source else a, tree)


def _split_layers(per_layer):
    """Per-layer inputs [L, ...] (layer 0, 1, 2, ...) -> (banded layers' [0, 2, ...], full layers' [1, 3, ...])."""
    return (None, None) if per_layer is None else (per_layer[0::2], per_layer[1::2])


def _layers(stacked, index):
    return None if stacked is None else jax.tree.map(lambda leaf: leaf[index], stacked,
                                                     is_leaf=lambda leaf: isinstance(leaf, LayerArrays))


def _in_place(layer: nnx.State, stacked: nnx.State, index) -> nnx.State:
    """One layer's parameters as the layer loop slices them, except MXFP4 weights, which become `Mxfp4Layer`
    views of their stacks (see there; the loop's own slices of them are then unused, and dropped by XLA). Float
    parameters stay the loop's slices: remat saves a layer's inputs, and a slice taken inside the loop would be
    saved for every layer — a copy of the whole stack."""

    def view(sliced, whole):
        if isinstance(whole, Mxfp4Weight) and whole.blocks.shape[0]:  # (one-layer models: no full layers)
            return Mxfp4Layer(whole, jnp.asarray(index, jnp.int32))
        return sliced

    return jax.tree.map(view, layer, stacked, is_leaf=lambda leaf: isinstance(leaf, Mxfp4Weight))


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
