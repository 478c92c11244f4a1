"""Attention with per-head sinks as Pallas kernels: flash attention (forward and backward) for training and
prefill, and decode attention over a KV cache.

gpt-oss's attention is a softmax whose every row also competes with a learned sink logit per head (a column with
no value), causal, on banded layers limited to the last `window` keys, with grouped-query heads; packed rows keep
to their own segment. The flash kernels walk key blocks with an online softmax that starts from the sink (running
max = sink, running sum = 1), so a row that sees no key gives zeros, and skip key blocks that the causal band
rules out entirely. The backward recomputes probabilities from the saved log-sum-exp: one kernel for dq, one for
dk and dv (per query head, summed over each key head's group outside), and the sink's gradient,
-sum over rows of p_sink * (dO . O), in XLA.

Generic Pallas (BlockSpecs, ref slices, jnp inside): `interpret=True` runs them on a CPU, and on a GPU they
compile with the lowering `kernels.lowering` chooses. `reference` (the model's XLA attention) is what they must
equal.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gptoss_jax.kernels.lowering import compiler_params
from gptoss_jax.ops import attention_mask, attention_with_sinks


class Options(NamedTuple):
    window: int | None  # keys within this many positions of the query (itself included); None: all earlier
    block_q: int
    block_k: int
    interpret: bool


# ---- flash attention (training, prefill) -----------------------------------------------------------------------


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, segment_ids: jax.Array, *,
                    window: int | None = None, block: int = 64, interpret: bool = False) -> jax.Array:
    """q [B, T, N, H], k and v [B, T, K, H] (N a multiple of K), sinks [N], segment_ids [B, T] -> [B, T, N, H]:
    each query attends to the keys at or before it, within `window`, of its own segment, and to its head's sink.
    Differentiable in q, k, v and sinks. T need not be a multiple of the block (it is padded)."""
    batch, length, heads, head_dim = q.shape
    tile = _tile(block, length)
    padded = -length % tile
    if padded:  # padding keys get a segment no query has; padding queries' outputs are dropped
        q, k, v = (jnp.pad(a, ((0, 0), (0, padded), (0, 0), (0, 0))) for a in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded)), constant_values=-1)
    options = Options(window, tile, tile, interpret)
    out = _flash(*(jnp.swapaxes(a, 1, 2) for a in (q, k, v)), sinks.astype(jnp.float32),
                 segment_ids.astype(jnp.int32), options)
    return jnp.swapaxes(out, 1, 2)[:, :length]


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _tile(block: int, length: int) -> int:
    """`block`, or less for short inputs — a power of two of at least 16 (Triton's smallest matmul side)."""
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two of at least 16, got {block}")
    return max(16, min(block, _next_power_of_two(length)))


def _key_blocks(q_start, options: Options, key_blocks: int):
    """The key blocks [first, last) a query block starting at q_start can see: none after it (causal), none wholly
    before its band."""
    last = jnp.minimum((q_start + options.block_q - 1) // options.block_k + 1, key_blocks)
    if options.window is None:
        return 0, last
    return jnp.maximum(q_start - options.window + 1, 0) // options.block_k, last


def _query_blocks(k_start, options: Options, query_blocks: int):
    """The query blocks [first, last) that can see a key block starting at k_start."""
    first = k_start // options.block_q
    if options.window is None:
        return first, query_blocks
    return first, jnp.minimum((k_start + options.block_k - 1 + options.window - 1) // options.block_q + 1,
                              query_blocks)


def _visible(q_start, k_start, q_segments, k_segments, options: Options):
    """[block_q, block_k] bool: causal, in the band, same segment."""
    query = q_start + jnp.arange(options.block_q)[:, None]
    key = k_start + jnp.arange(options.block_k)[None, :]
    allowed = (key <= query) & (q_segments[:, None] == k_segments[None, :])
    if options.window is not None:
        allowed &= query - key < options.window
    return allowed


def _scores(q, k, scale):
    return jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale


def _online_softmax(carry, scores, values):
    """One key block into the running (max, sum of exp, weighted values) of each query row."""
    peak, total, accumulator = carry
    new_peak = jnp.maximum(peak, scores.max(axis=-1))
    weights = jnp.exp(scores - new_peak[:, None])
    decay = jnp.exp(peak - new_peak)
    accumulator = accumulator * decay[:, None] + jnp.dot(weights.astype(values.dtype), values,
                                                         preferred_element_type=jnp.float32)
    return new_peak, total * decay + weights.sum(axis=-1), accumulator


def _flash_forward_kernel(sinks_ref, q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, out_ref, lse_ref, *, options: Options):
    head, q_block = pl.program_id(1), pl.program_id(2)
    q_start = q_block * options.block_q
    q = q_ref[0, 0]
    q_segments = q_seg_ref[0]
    scale = 1 / math.sqrt(q.shape[-1])
    sink = sinks_ref[head]

    def step(index, carry):
        k_start = index * options.block_k
        keys = k_ref[0, 0, pl.ds(k_start, options.block_k), :]
        values = v_ref[0, 0, pl.ds(k_start, options.block_k), :]
        visible = _visible(q_start, k_start, q_segments, k_seg_ref[0, pl.ds(k_start, options.block_k)], options)
        return _online_softmax(carry, jnp.where(visible, _scores(q, keys, scale), -jnp.inf), values)

    first, last = _key_blocks(q_start, options, k_ref.shape[2] // options.block_k)
    start = (jnp.full((options.block_q,), sink, jnp.float32), jnp.ones((options.block_q,), jnp.float32),
             jnp.zeros(q.shape, jnp.float32))  # the sink is the first column: exp(sink - sink) = 1
    peak, total, accumulator = jax.lax.fori_loop(first, last, step, start)
    out_ref[0, 0] = (accumulator / total[:, None]).astype(out_ref.dtype)
    lse_ref[0, 0] = peak + jnp.log(total)


def _flash_dq_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, lse_ref, delta_ref, grad_ref, dq_ref, *,
                     options: Options):
    q_block = pl.program_id(2)
    q_start = q_block * options.block_q
    q, grad = q_ref[0, 0], grad_ref[0, 0]
    lse, delta, q_segments = lse_ref[0, 0], delta_ref[0, 0], q_seg_ref[0]
    scale = 1 / math.sqrt(q.shape[-1])

    def step(index, dq):
        k_start = index * options.block_k
        keys = k_ref[0, 0, pl.ds(k_start, options.block_k), :]
        values = v_ref[0, 0, pl.ds(k_start, options.block_k), :]
        visible = _visible(q_start, k_start, q_segments, k_seg_ref[0, pl.ds(k_start, options.block_k)], options)
        probs = jnp.where(visible, jnp.exp(_scores(q, keys, scale) - lse[:, None]), 0.0)
        dprobs = _scores(grad, values, 1.0)
        dscores = probs * (dprobs - delta[:, None])
        return dq + jnp.dot(dscores.astype(keys.dtype), keys, preferred_element_type=jnp.float32)

    first, last = _key_blocks(q_start, options, k_ref.shape[2] // options.block_k)
    dq = jax.lax.fori_loop(first, last, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[0, 0] = (dq * scale).astype(dq_ref.dtype)


def _flash_dkv_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, lse_ref, delta_ref, grad_ref, dk_ref, dv_ref, *,
                options: Options):
    k_block = pl.program_id(2)
    k_start = k_block * options.block_k
    keys, values, k_segments = k_ref[0, 0], v_ref[0, 0], k_seg_ref[0]
    scale = 1 / math.sqrt(keys.shape[-1])

    def step(index, carry):
        dk, dv = carry
        q_start = index * options.block_q
        rows = pl.ds(q_start, options.block_q)
        q, grad = q_ref[0, 0, rows, :], grad_ref[0, 0, rows, :]
        lse, delta = lse_ref[0, 0, rows], delta_ref[0, 0, rows]
        visible = _visible(q_start, k_start, q_seg_ref[0, rows], k_segments, options)
        probs = jnp.where(visible, jnp.exp(_scores(q, keys, scale) - lse[:, None]), 0.0)
        dv = dv + jax.lax.dot_general(probs.astype(grad.dtype), grad, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        dscores = probs * (_scores(grad, values, 1.0) - delta[:, None])
        dk = dk + jax.lax.dot_general(dscores.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        return dk, dv

    first, last = _query_blocks(k_start, options, q_ref.shape[2] // options.block_q)
    zeros = jnp.zeros(keys.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(first, last, step, (zeros, zeros))
    dk_ref[0, 0] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[0, 0] = dv.astype(dv_ref.dtype)


def _specs(q, k, options: Options):
    """BlockSpecs over a grid (batch, query head, block): this block of a head's queries, every key of its key
    head (the group's), and the same for the per-row values."""
    group = q.shape[1] // k.shape[1]
    length, head_dim = q.shape[2], q.shape[3]
    return {
        "q_block": pl.BlockSpec((1, 1, options.block_q, head_dim), lambda b, n, i: (b, n, i, 0)),
        "q_all": pl.BlockSpec((1, 1, length, head_dim), lambda b, n, i: (b, n, 0, 0)),
        "kv_all": pl.BlockSpec((1, 1, length, head_dim), lambda b, n, i: (b, n // group, 0, 0)),
        "kv_block": pl.BlockSpec((1, 1, options.block_k, head_dim), lambda b, n, i: (b, n // group, i, 0)),
        "seg_q_block": pl.BlockSpec((1, options.block_q), lambda b, n, i: (b, i)),
        "seg_k_block": pl.BlockSpec((1, options.block_k), lambda b, n, i: (b, i)),
        "seg_all": pl.BlockSpec((1, length), lambda b, n, i: (b, 0)),
        "row_block": pl.BlockSpec((1, 1, options.block_q), lambda b, n, i: (b, n, i)),
        "row_all": pl.BlockSpec((1, 1, length), lambda b, n, i: (b, n, 0)),
        "sinks": pl.BlockSpec(q.shape[1:2], lambda b, n, i: (0,)),
        "per_head_k_block": pl.BlockSpec((1, 1, options.block_k, head_dim), lambda b, n, i: (b, n, i, 0)),
    }


def _forward(q, k, v, sinks, segment_ids, options: Options):
    batch, heads, length, head_dim = q.shape
    specs = _specs(q, k, options)
    return pl.pallas_call(
        functools.partial(_flash_forward_kernel, options=options),
        grid=(batch, heads, length // options.block_q),
        in_specs=[specs["sinks"], specs["q_block"], specs["kv_all"], specs["kv_all"], specs["seg_q_block"],
                  specs["seg_all"]],
        out_specs=[specs["q_block"], specs["row_block"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)],
        interpret=options.interpret,
        compiler_params=compiler_params(options.interpret),
    )(sinks, q, k, v, segment_ids, segment_ids)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, sinks, segment_ids, options: Options):
    return _forward(q, k, v, sinks, segment_ids, options)[0]


def _flash_forward(q, k, v, sinks, segment_ids, options: Options):
    out, lse = _forward(q, k, v, sinks, segment_ids, options)
    return out, (q, k, v, sinks, segment_ids, out, lse)


def _flash_backward(options: Options, residuals, grad):
    q, k, v, sinks, segment_ids, out, lse = residuals
    batch, heads, length, head_dim = q.shape
    group = heads // k.shape[1]
    delta = jnp.sum(grad.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, N, T]
    specs = _specs(q, k, options)
    dq = pl.pallas_call(
        functools.partial(_flash_dq_kernel, options=options),
        grid=(batch, heads, length // options.block_q),
        in_specs=[specs["q_block"], specs["kv_all"], specs["kv_all"], specs["seg_q_block"], specs["seg_all"],
                  specs["row_block"], specs["row_block"], specs["q_block"]],
        out_specs=specs["q_block"],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=options.interpret,
        compiler_params=compiler_params(options.interpret),
    )(q, k, v, segment_ids, segment_ids, lse, delta, grad)
    per_head = jax.ShapeDtypeStruct((batch, heads, length, head_dim), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_flash_dkv_kernel, options=options),
        grid=(batch, heads, length // options.block_k),
        in_specs=[specs["q_all"], specs["kv_block"], specs["kv_block"], specs["seg_all"], specs["seg_k_block"],
                  specs["row_all"], specs["row_all"], specs["q_all"]],
        out_specs=[specs["per_head_k_block"], specs["per_head_k_block"]],
        out_shape=[per_head, per_head],
        interpret=options.interpret,
        compiler_params=compiler_params(options.interpret),
    )(q, k, v, segment_ids, segment_ids, lse, delta, grad)
    dk, dv = (a.reshape(batch, k.shape[1], group, length, head_dim).sum(axis=2).astype(k.dtype) for a in (dk, dv))
    dsinks = -jnp.sum(jnp.exp(sinks[None, :, None] - lse) * delta, axis=(0, 2))
    return dq, dk, dv, dsinks, None


_flash.defvjp(_flash_forward, _flash_backward)


# ---- decode attention --------------------------------------------------------------------------------------------


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, visible: jax.Array, *,
                     block: int = 128, interpret: bool = False) -> jax.Array:
    """New tokens' queries q [B, 1, N, H] against a cache k, v [B, S, K, H] whose slots `visible` [B, S] marks
    (ring buffers included: the order of slots does not matter) -> [B, 1, N, H]. One grid step per (row, key
    head) serves the whole query group, walking the cache a block at a time."""
    batch, _, heads, head_dim = q.shape
    kv_heads, slots = k.shape[2], k.shape[1]
    group = heads // kv_heads
    tile = _tile(block, slots)
    padded = -slots % tile
    if padded:
        k, v = (jnp.pad(a, ((0, 0), (0, padded), (0, 0), (0, 0))) for a in (k, v))
        visible = jnp.pad(visible, ((0, 0), (0, padded)))
    rows = _next_power_of_two(max(group, 16))  # Triton: power-of-two blocks, 16 rows at least (zero padding)
    queries = jnp.pad(q.reshape(batch, kv_heads, group, head_dim), ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    sinks = jnp.pad(sinks.astype(jnp.float32).reshape(kv_heads, group), ((0, 0), (0, rows - group)))
    kv = [jnp.swapaxes(a, 1, 2) for a in (k, v)]  # [B, K, S, H]
    length = kv[0].shape[2]
    out = pl.pallas_call(
        functools.partial(_decode_attention_kernel, block=tile),
        grid=(batch, kv_heads),
        in_specs=[pl.BlockSpec((1, rows), lambda b, h: (h, 0)),
                  pl.BlockSpec((1, 1, rows, head_dim), lambda b, h: (b, h, 0, 0)),
                  pl.BlockSpec((1, 1, length, head_dim), lambda b, h: (b, h, 0, 0)),
                  pl.BlockSpec((1, 1, length, head_dim), lambda b, h: (b, h, 0, 0)),
                  pl.BlockSpec((1, length), lambda b, h: (b, 0))],
        out_specs=pl.BlockSpec((1, 1, rows, head_dim), lambda b, h: (b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(queries.shape, q.dtype),
        interpret=interpret,
        compiler_params=compiler_params(interpret),
    )(sinks, queries, *kv, visible.astype(jnp.int32))
    return out[:, :, :group].reshape(batch, 1, heads, head_dim)


def _decode_attention_kernel(sinks_ref, q_ref, k_ref, v_ref, visible_ref, out_ref, *, block: int):
    q = q_ref[0, 0]  # [group, H]
    scale = 1 / math.sqrt(q.shape[-1])

    def step(index, carry):
        slots = pl.ds(index * block, block)
        keys, values = k_ref[0, 0, slots, :], v_ref[0, 0, slots, :]
        visible = visible_ref[0, slots][None, :] != 0
        return _online_softmax(carry, jnp.where(visible, _scores(q, keys, scale), -jnp.inf), values)

    sink = sinks_ref[0]
    start = (sink, jnp.ones_like(sink), jnp.zeros(q.shape, jnp.float32))
    _, total, accumulator = jax.lax.fori_loop(0, k_ref.shape[2] // block, step, start)
    out_ref[0, 0] = (accumulator / total[:, None]).astype(out_ref.dtype)


def reference(q, k, v, sinks, segment_ids, *, window=None):
    """The model's dense XLA attention with the mask these arguments describe."""
    return attention_with_sinks(q, k, v, sinks, attention_mask(segment_ids, window))
