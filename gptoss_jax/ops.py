"""The math the model and the Pallas kernels share, in plain JAX: the mixed-precision matmul, attention with sinks
(the dense reference and the blockwise path the model runs on long sequences), gpt-oss's clamped SwiGLU, and the
experts' grouped matmul.

`gptoss_jax.model` composes these into layers; `gptoss_jax.kernels` are faster versions of the same products and
are tested against the functions here. Nothing here imports either of them.

Both long-sequence paths are written so their memory does not grow with the product of their two large sizes:
`blockwise_attention` never holds a [T, T] score matrix (forward or backward), and `grouped_matmul` makes one
expert's weight dense at a time, only for experts that have rows.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import CustomVJPPrimal

from gptoss_jax import backend
from gptoss_jax.mxfp4 import Mxfp4Layer, Mxfp4Weight, dequantize_rows, is_packed

# ---- matmul ------------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def matmul(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, x, w)` summed in float32 and rounded to x's dtype, as are its gradients.

    Mixed precision as PEFT and torch autocast do it: operands and gradients in the model dtype, products
    accumulated in float32. (Autodiff of a float32-result product would carry float32 gradients into the backward
    products, which would then multiply float32 copies of the weights.)
    """
    return _product(spec, x, w).astype(x.dtype)


def _product(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum with float32 results. On a CPU a lone bfloat16 row is multiplied beside a copy of itself: XLA's CPU
    backend multiplies a single bf16 row by a float32 copy of the weight (about 1 GB/s of weights here), two
    rows with its bf16 kernel (about 12 GB/s), and batch-1 decoding is all single rows."""
    if backend.platform() == "cpu" and x.dtype == jnp.bfloat16 and x.shape[0] == 1 and _rows(spec, x) == 1:
        return jnp.einsum(spec, jnp.concatenate([x, x]), w, preferred_element_type=jnp.float32)[:1]
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)


def _rows(spec: str, x: jax.Array) -> int:
    """How many products x makes in `spec`: its size over its contracted axes' (theirs only in x and w)."""
    inputs, out = spec.split("->")
    x_spec = inputs.split(",")[0].replace("...", "")
    axes = x.shape[x.ndim - len(x_spec):]
    return x.size // math.prod(size for letter, size in zip(x_spec, axes, strict=True) if letter not in out)


def _matmul_fwd(spec, x, w):
    return matmul(spec, x, w), (x, w)


def _matmul_bwd(spec, residuals, grad):
    x, w = residuals
    inputs, out = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    grad = grad.astype(x.dtype)
    d_x = _product(f"{out},{w_spec}->{x_spec}", grad, w)
    d_w = jnp.einsum(f"{x_spec},{out}->{w_spec}", x, grad, preferred_element_type=jnp.float32)
    return d_x.astype(x.dtype), d_w.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


# ---- SwiGLU ----------------------------------------------------------------------------------------------------


def clamped_swiglu(h: jax.Array, alpha: float, limit: float) -> jax.Array:
    """gpt-oss's SwiGLU on interleaved columns (gate = even, linear = odd), clamped for stability. (Split by a
    reshape rather than strided slices, which the Pallas kernels' Triton lowering cannot express.)"""
    gate, linear = jax.lax.unstack(h.reshape(*h.shape[:-1], h.shape[-1] // 2, 2), axis=-1)
    gate = jnp.minimum(gate, limit)
    linear = jnp.clip(linear, -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (linear + 1)


# ---- attention with sinks: masks and the dense reference ---------------------------------------------------------


def attention_mask(segment_ids: jax.Array, window: int | None) -> jax.Array:
    """[B, T, S] bool: causal, within `window` keys (the query's own included) if given, same segment only."""
    length = segment_ids.shape[1]
    query, key = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= query - key < window
    return allowed[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])


class SegmentMask(NamedTuple):
    """Causal attention within `window` keys (None: all earlier ones) among tokens of the same segment: the form
    the blockwise path and the flash kernel take; `attention_mask` expands it for the dense path."""

    segment_ids: jax.Array  # [B, T]
    window: int | None


def attention_with_sinks(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query softmax attention whose every row also competes with a learned per-head sink logit.

    q [B, T, N, H], k and v [B, S, K, H], sinks [N] (float32), mask [B, T, S] bool -> [B, T, N, H].
    The sink is one more column in the softmax that has no value: it takes probability mass away, so a row's
    weights sum to less than one, and a fully masked row gives zeros rather than NaN. Dense: it holds the
    [B, N, T, S] scores, so it serves decoding (T = 1), short sequences, and as the tested reference.
    """
    batch, length, num_heads, head_dim = q.shape
    num_kv_heads, dtype = k.shape[2], v.dtype
    if backend.platform() == "cpu" and dtype == jnp.bfloat16:
        # XLA's CPU backend cannot run every batched bfloat16 dot with float32 results (a KV cache read in place,
        # heads before positions: "Unsupported element type for DotThunk"); it computes them in float32 anyway
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    q = q.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    sink = sinks.astype(jnp.float32).reshape(1, num_kv_heads, -1, 1, 1)
    peak = jnp.maximum(scores.max(axis=-1, keepdims=True), sink)
    weights = jnp.exp(scores - peak)
    probs = weights / (weights.sum(axis=-1, keepdims=True) + jnp.exp(sink - peak))
    # the product's own batch-major order, then the small result transposed: asked for [B, T, K, G, H] directly,
    # XLA's CPU backend runs it 2.7-3.2x slower (a decode step's 16 rows over 320 / 1,024 cached positions)
    out = jnp.einsum("bkgts,bskh->bkgth", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return jnp.swapaxes(out.reshape(batch, num_heads, length, head_dim), 1, 2).astype(dtype)


# ---- attention with sinks, blockwise -----------------------------------------------------------------------------


class Band(NamedTuple):
    """Which (query block, key block) pairs can hold a visible pair: queries see keys at or before them, within
    `window` positions (None: all), in square blocks of `block` positions."""

    window: int | None
    block: int

    def key_blocks(self, query_block):
        """[first, last) key blocks that query block `query_block` can see."""
        last = query_block + 1
        if self.window is None:
            return 0, last
        return jnp.maximum(query_block * self.block - self.window + 1, 0) // self.block, last

    def query_blocks(self, key_block, count: int):
        """[first, last) query blocks (of `count`) that can see key block `key_block`."""
        if self.window is None:
            return key_block, count
        return key_block, jnp.minimum((key_block * self.block + self.block - 1 + self.window - 1) // self.block + 1,
                                      count)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, segment_ids: jax.Array, *,
                        window: int | None = None, block: int = 128) -> jax.Array:
    """`attention_with_sinks` under a `SegmentMask`, a block of queries against a block of keys at a time.

    q [B, T, N, H], k and v [B, T, K, H] (the same T positions), sinks [N], segment_ids [B, T] -> [B, T, N, H].
    Each query block runs an online softmax over the key blocks it can see, seeded with the sink (running max =
    sink, running sum = 1). Key blocks wholly after the queries, wholly before the band, or of no segment the
    queries hold are skipped, so a banded layer costs O(T x window) and a packed row O(sum of segment lengths
    squared). Differentiable in q, k, v and sinks; the backward recomputes each block's probabilities from the
    saved log-sum-exp, so nothing of size T x T is ever held. T need not be a multiple of the block.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    padding = -length % block
    if padding:  # padding keys get a segment no real query has; padding queries are dropped
        q, k, v = (jnp.pad(a, ((0, 0), (0, padding), (0, 0), (0, 0))) for a in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padding)), constant_values=-1)
    blocks = (length + padding) // block

    def to_blocks(a):  # [B, T, K, ..., H] -> [blocks, B, K, ..., block, H]
        a = a.reshape(batch, blocks, block, kv_heads, -1, head_dim)
        return jnp.moveaxis(a, (1, 2), (0, 4))

    queries = to_blocks(q)  # [blocks, B, K, G, block, H]
    keys, values = (to_blocks(a)[:, :, :, 0] for a in (k, v))  # [blocks, B, K, block, H]
    segments = jnp.moveaxis(segment_ids.astype(jnp.int32).reshape(batch, blocks, block), 1, 0)
    group_sinks = sinks.astype(jnp.float32).reshape(kv_heads, heads // kv_heads)
    out = _blockwise(queries, keys, values, group_sinks, segments, Band(window, block))
    out = jnp.moveaxis(out, (0, 4), (1, 2)).reshape(batch, blocks * block, heads, head_dim)
    return out[:, :length]


def _pair_mask(band: Band, query_block, key_block, query_segments, key_segments) -> jax.Array:
    """[B, 1, 1, block, block]: which queries of one block see which keys of another."""
    query = query_block * band.block + jnp.arange(band.block)[:, None]
    key = key_block * band.block + jnp.arange(band.block)[None, :]
    allowed = key <= query
    if band.window is not None:
        allowed &= query - key < band.window
    same = query_segments[:, :, None] == key_segments[:, None, :]
    return (allowed & same)[:, None, None]


def _segments_meet(query_segments, key_segments) -> jax.Array:
    """Whether any row of two blocks can share a segment (their id ranges overlap): a cheap test that lets the
    loops skip key blocks of earlier sequences in a packed row."""
    return jnp.any((query_segments.min(axis=1) <= key_segments.max(axis=1))
                   & (key_segments.min(axis=1) <= query_segments.max(axis=1)))


def _scores(q_block, k_block):
    scale = 1 / math.sqrt(q_block.shape[-1])
    return jnp.einsum("bkgqh,bksh->bkgqs", q_block, k_block, preferred_element_type=jnp.float32) * scale


def _blockwise_forward(queries, keys, values, sinks, segments, band: Band):
    """-> (out [blocks, B, K, G, block, H] in the values' dtype, log-sum-exp [blocks, B, K, G, block] with the
    sink included)."""

    def query_block(args):
        index, q = args
        q_segments = segments[index]

        def visit(key_block, carry):
            peak, total, accumulator = carry
            scores = jnp.where(_pair_mask(band, index, key_block, q_segments, segments[key_block]),
                               _scores(q, keys[key_block]), -jnp.inf)
            new_peak = jnp.maximum(peak, scores.max(axis=-1))
            weights = jnp.exp(scores - new_peak[..., None])
            decay = jnp.exp(peak - new_peak)
            accumulator = accumulator * decay[..., None] + jnp.einsum(
                "bkgqs,bksh->bkgqh", weights.astype(values.dtype), values[key_block],
                preferred_element_type=jnp.float32)
            return new_peak, total * decay + weights.sum(axis=-1), accumulator

        def step(key_block, carry):
            return jax.lax.cond(_segments_meet(q_segments, segments[key_block]), visit, lambda _, c: c,
                                key_block, carry)

        # The sink is the first column: running max = sink, running sum = exp(sink - sink) = 1.
        rows = q.shape[:-1]
        start = (jnp.broadcast_to(sinks[None, :, :, None], rows), jnp.ones(rows, jnp.float32),
                 jnp.zeros(q.shape, jnp.float32))
        peak, total, accumulator = jax.lax.fori_loop(*band.key_blocks(index), step, start)
        return (accumulator / total[..., None]).astype(values.dtype), peak + jnp.log(total)

    return jax.lax.map(query_block, (jnp.arange(queries.shape[0]), queries))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise(queries, keys, values, sinks, segments, band: Band):
    return _blockwise_forward(queries, keys, values, sinks, segments, band)[0]


def _blockwise_fwd(queries, keys, values, sinks, segments, band: Band):
    out, lse = _blockwise_forward(queries, keys, values, sinks, segments, band)
    # Named, as the model names the output, so a remat policy can keep them rather than replay the forward.
    out, lse = checkpoint_name((out, lse), "attention")
    return out, (queries, keys, values, sinks, segments, out, lse)


def _blockwise_bwd(band: Band, residuals, grad):
    """One pass over key blocks: each accumulates its dk and dv over the query blocks that see it, and adds
    their share to dq. Per pair: P = exp(S - lse), dV += P^T dO, dS = P (dO V^T - delta), dK += dS^T Q,
    dQ += dS K, with delta = rowsum(dO * O); the sink's gradient is -sum over rows of P_sink * delta."""
    queries, keys, values, sinks, segments, out, lse = residuals
    count = queries.shape[0]
    delta = jnp.sum(grad.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [blocks, B, K, G, block]
    scale = 1 / math.sqrt(queries.shape[-1])

    def key_block(dq, index):
        k, v, k_segments = keys[index], values[index], segments[index]

        def visit(query_block, carry):
            dk, dv, dq = carry
            q, do = queries[query_block], grad[query_block]
            visible = _pair_mask(band, query_block, index, segments[query_block], k_segments)
            probs = jnp.where(visible, jnp.exp(_scores(q, k) - lse[query_block][..., None]), 0.0)
            dv += jnp.einsum("bkgqs,bkgqh->bksh", probs.astype(do.dtype), do, preferred_element_type=jnp.float32)
            dprobs = jnp.einsum("bkgqh,bksh->bkgqs", do, v, preferred_element_type=jnp.float32)
            dscores = (probs * (dprobs - delta[query_block][..., None]) * scale).astype(q.dtype)
            dk += jnp.einsum("bkgqs,bkgqh->bksh", dscores, q, preferred_element_type=jnp.float32)
            dq = dq.at[query_block].add(jnp.einsum("bkgqs,bksh->bkgqh", dscores, k,
                                                   preferred_element_type=jnp.float32))
            return dk, dv, dq

        def step(query_block, carry):
            return jax.lax.cond(_segments_meet(segments[query_block], k_segments), visit, lambda _, c: c,
                                query_block, carry)

        zeros = jnp.zeros(k.shape, jnp.float32)
        dk, dv, dq = jax.lax.fori_loop(*band.query_blocks(index, count), step, (zeros, zeros, dq))
        return dq, (dk.astype(keys.dtype), dv.astype(values.dtype))

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(queries.shape, jnp.float32), jnp.arange(count))
    dsinks = -jnp.sum(jnp.exp(sinks[None, None, :, :, None] - lse) * delta, axis=(0, 1, 4))
    return dq.astype(queries.dtype), dk, dv, dsinks, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ---- the experts' grouped matmul ---------------------------------------------------------------------------------

TILE_ROWS = (256, 32)  # rows per matmul: whole tiles of the first size, then the rest of a group in the second


class LowRank(NamedTuple):
    """A LoRA of every group's weight: `scaling * (x @ a[g]) @ b[g]` is added to `x @ weight[g]`."""

    a: jax.Array  # [G, K, R]
    b: jax.Array  # [G, R, N]
    scaling: float


def grouped_matmul(rows: jax.Array, weight: jax.Array | Mxfp4Weight | Mxfp4Layer, group_sizes: jax.Array,
                   bias: jax.Array | None = None, low_rank: LowRank | None = None, *, out_dtype=jnp.float32,
                   tiles: tuple[int, int] = TILE_ROWS) -> jax.Array:
    """rows [M, K], sorted by group, times their group's weight [G, K, N] (dense, or MXFP4), plus their
    group's bias [G, N] and low-rank update -> [M, N] in `out_dtype` (summed in float32, rounded once at the
    end: a bf16 model asks for bf16, as its peers' experts give); rows past the last group give zeros.
    (`jax.lax.ragged_dot`, plus bias and LoRA, in PEFT's order of operations: x @ W + b + s * (x @ A) @ B.)

    A loop over the groups that have rows: each makes its weight dense in the rows' dtype once (cast, or
    dequantized from MXFP4) and multiplies its rows a tile at a time, the adapter's two thin products beside.
    So only one group's weight is ever dense and experts nobody chose are never read, whatever the backend; on a
    CPU this is also much faster than XLA's `ragged_dot`, which computes every group for every row there.
    Differentiable in rows, dense weights, bias and the adapter (the backward loops the same way, computing
    only the gradients asked for: a frozen base weight costs no [G, K, N] buffer).
    """
    if weight.shape[0] != group_sizes.shape[0] or weight.shape[1] != rows.shape[1]:
        raise ValueError(f"rows {rows.shape}, weight {weight.shape} and group_sizes {group_sizes.shape} disagree")
    if bias is None:
        bias = jnp.zeros((weight.shape[0], weight.shape[2]), jnp.float32)
    factors = None if low_rank is None else (low_rank.a, low_rank.b, jnp.asarray(low_rank.scaling, jnp.float32))
    count = rows.shape[0]
    short = max(max(tiles) - count, 0)  # tiles never run past the last row: fewer rows than a tile are padded
    rows = jnp.pad(rows, ((0, short), (0, 0))) if short else rows
    out = _grouped(rows, weight, group_sizes.astype(jnp.int32), bias, factors, tiles, jnp.dtype(out_dtype))
    return out[:count] if short else out


def grouped_low_rank(rows: jax.Array, low_rank: LowRank, group_sizes: jax.Array) -> jax.Array:
    """The low-rank update `scaling * (x @ a[g]) @ b[g]` of rows [M, K] sorted into groups of `group_sizes`, each by
    its own group's factors -> float32 [M, N]; rows past the last group get 0. Two dense products over every
    group's factors side by side (G x rank columns: still thin), the other groups' columns zeroed between them: a
    few large matmuls where a loop over the groups launches small ones per group (the Pallas experts' adapters on
    a GPU; benchmarks/gpu_roofline.py). Rounded to the rows' dtype between the two, as `grouped_matmul`."""
    groups, inputs, rank = low_rank.a.shape
    group = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows.shape[0]), side="right", method="compare_all")
    a = jnp.swapaxes(low_rank.a, 0, 1).reshape(inputs, groups * rank).astype(rows.dtype)
    inner = jnp.dot(rows, a, preferred_element_type=jnp.float32)
    own = jnp.arange(groups * rank)[None, :] // rank == group[:, None]
    inner = jnp.where(own, inner, 0).astype(rows.dtype)
    b = low_rank.b.reshape(groups * rank, -1).astype(rows.dtype)
    return jnp.dot(inner, b, preferred_element_type=jnp.float32) * low_rank.scaling


def _group_weight(weight, group, dtype) -> jax.Array:
    """Group `group`'s weight in `dtype`: dense weights as stored, [K, N]; MXFP4 ones dequantized in their
    stored, output-major layout [N, K], which saves a transpose (see `_meets_rows`)."""
    if is_packed(weight):
        # The barrier keeps XLA from rewriting decode(slice) as slice(decode) and hoisting the decoding of every
        # expert out of the loop (int32 intermediates of the whole layer: 8 bytes a value).
        expert = jax.lax.optimization_barrier(weight.experts(group))
        return dequantize_rows(expert.blocks, expert.scales, dtype)
    return weight[group].astype(dtype)


def _meets_rows(weight) -> int:
    """The axis of a group's weight (`_group_weight`) that the rows' K axis contracts with."""
    return 1 if is_packed(weight) else 0


def _contract(a, b, axes):
    return jax.lax.dot_general(a, b, (axes, ((), ())), preferred_element_type=jnp.float32)


def _each_tile(group_sizes, rows, tiles, prepare, visit, finish, carry):
    """Loops over the groups that have rows and over each one's rows a tile at a time (whole tiles of
    `tiles[0]` rows, then the rest in tiles of `tiles[1]`), of `rows` rows in all (at least `tiles[0]`). Per
    group: `own = prepare(group)` (its weights, its accumulators); per tile: `carry, own = visit(carry, own,
    start, size, valid)`, with the tile's first row, its static row count, and [size] marks of the rows that are
    the group's; then `carry = finish(carry, own, group)`. A tile that would run past the last row starts
    earlier instead, so it may also hold rows of earlier groups: `valid` leaves them out."""
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes

    def group(index, carry):
        state, done = (carry, prepare(index)), 0
        for size in tiles:
            left = group_sizes[index] - done
            count = left // size if size != tiles[-1] else (left + size - 1) // size

            def tile(t, state, size=size, done=done):
                first = starts[index] + done + t * size
                start = jnp.minimum(first, rows - size)
                row = start + jnp.arange(size)
                return visit(*state, start, size, (row >= first) & (row < ends[index]))

            state = jax.lax.fori_loop(0, count, tile, state)
            done = done + count * size
        return finish(*state, index)

    # Only the groups that have rows are visited (experts nobody chose are never read), listed first, rather than
    # every group behind a conditional: on a GPU, XLA copies a conditional's whole carry (the [M, N] output) in
    # each branch, twice a group (benchmarks/gpu_roofline.py).
    chosen = jnp.nonzero(group_sizes > 0, size=group_sizes.shape[0], fill_value=0)[0]

    def next_group(state):
        step, carry = state
        return step + 1, group(chosen[step], carry)

    # A while loop, not a scan (which a fori_loop with static bounds becomes): under remat, a scan's per-group
    # intermediates (the decoded weights) would be stacked and kept as residuals.
    return jax.lax.while_loop(lambda state: state[0] < jnp.sum(group_sizes > 0), next_group, (0, carry))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _grouped(rows, weight, group_sizes, bias, factors, tiles, out_dtype):
    """`grouped_matmul`; factors: None, or a LoRA's (a, b, scaling) with a traced scaling (it may come through
    shard_map)."""
    return _grouped_forward(rows, weight, group_sizes, bias, factors, tiles, out_dtype)


def _group_factors(factors, group, dtype):
    """(a, b) of one group in `dtype`, or None."""
    return None if factors is None else tuple(f[group].astype(dtype) for f in factors[:2])


def _grouped_forward(rows, weight, group_sizes, bias, factors, tiles, out_dtype):
    count, dtype = rows.shape[0], rows.dtype

    def prepare(group):
        return (_group_weight(weight, group, dtype), bias[group].astype(jnp.float32),
                _group_factors(factors, group, dtype))

    def visit(out, own, start, size, valid):
        w, b, low_rank = own
        x = jax.lax.dynamic_slice_in_dim(rows, start, size)
        product = _contract(x, w, ((1,), (_meets_rows(weight),))) + b
        if low_rank is not None:
            product += factors[2] * _contract(_contract(x, low_rank[0], ((1,), (0,))).astype(dtype), low_rank[1],
                                              ((1,), (0,)))
        return _write_rows(out, start, valid, product), own

    out = jnp.zeros((count, weight.shape[2]), out_dtype)  # rows of no group stay zero
    return _each_tile(group_sizes, count, tiles, prepare, visit, lambda out, own, group: out, out)


def _write_rows(out, start, valid, values):
    """out with the `valid` rows of the tile at `start` replaced by `values` (the others are other groups')."""
    kept = jax.lax.dynamic_slice_in_dim(out, start, values.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(valid[:, None], values.astype(out.dtype), kept),
                                               start, 0)


def _grouped_fwd(rows, weight, group_sizes, bias, factors, tiles, out_dtype):
    # symbolic_zeros: each argument's leaves come as (value, perturbed), so the backward computes only the
    # gradients asked for.
    def unwrap(argument):
        is_primal = lambda x: isinstance(x, CustomVJPPrimal)  # noqa: E731
        value = jax.tree.map(lambda p: p.value, argument, is_leaf=is_primal)
        return value, any(p.perturbed for p in jax.tree.leaves(argument, is_leaf=is_primal))

    (rows, need_rows), (weight, need_weight), (group_sizes, _), (bias, need_bias), (factors, need_factors) = map(
        unwrap, (rows, weight, group_sizes, bias, factors))
    needs = (need_rows, need_weight and not is_packed(weight), need_bias, need_factors)
    out = _grouped_forward(rows, weight, group_sizes, bias, factors, tiles, out_dtype)
    return out, ((rows, weight, group_sizes, bias, factors), needs)


def _grouped_bwd(tiles, out_dtype, residuals, grad):
    """Per tile, with g the output's gradient (zero on rows not of the group): d rows = g W^T + s (g B^T) A^T,
    d W += rows^T g, d bias += sum of g, d A += s rows^T (g B^T), d B += s (rows A)^T g."""
    (rows, weight, group_sizes, bias, factors), (need_rows, need_weight, need_bias, need_factors) = residuals
    count, dtype = rows.shape[0], rows.dtype
    inputs, outputs = weight.shape[1:]
    scaling = None if factors is None else factors[2]

    def prepare(group):
        w = _group_weight(weight, group, dtype) if need_rows else None
        sums = (jnp.zeros((inputs, outputs), jnp.float32) if need_weight else None,
                jnp.zeros((outputs,), jnp.float32) if need_bias else None,
                tuple(jnp.zeros(f.shape[1:], jnp.float32) for f in factors[:2]) if need_factors else None)
        return w, _group_factors(factors, group, dtype), sums

    def visit(carry, own, start, size, valid):
        # Products in the rows' dtype, summed in float32 (the gradient arrives in the output's dtype): converting
        # a slice inside the loop would let XLA hoist a float32 copy of the whole array out of it.
        w, low_rank, (w_sum, b_sum, factor_sums) = own
        g = jnp.where(valid[:, None], jax.lax.dynamic_slice_in_dim(grad, start, size), 0).astype(dtype)
        x = jax.lax.dynamic_slice_in_dim(rows, start, size)
        if low_rank is not None:
            g_b = _contract(g, low_rank[1], ((1,), (1,))).astype(dtype)  # g B^T [size, R]
        if need_rows:
            product = _contract(g, w, ((1,), (1 - _meets_rows(weight),)))
            if low_rank is not None:
                product += scaling * _contract(g_b, low_rank[0], ((1,), (1,)))
            carry = (_write_rows(carry[0], start, valid, product), *carry[1:])
        if need_weight:
            w_sum += _contract(x, g, ((0,), (0,)))
        if need_bias:
            b_sum += jnp.sum(g, axis=0, dtype=jnp.float32)
        if need_factors:
            x_a = _contract(x, low_rank[0], ((1,), (0,))).astype(dtype)  # rows A [size, R]
            factor_sums = (factor_sums[0] + scaling * _contract(x, g_b, ((0,), (0,))),
                           factor_sums[1] + scaling * _contract(x_a, g, ((0,), (0,))))
        return carry, (w, low_rank, (w_sum, b_sum, factor_sums))

    def finish(carry, own, group):  # the group's sums into the full-size gradients
        d_rows, d_weight, d_bias, d_factors = carry
        w_sum, b_sum, factor_sums = own[2]
        if need_weight:
            d_weight = d_weight.at[group].set(w_sum.astype(d_weight.dtype))
        if need_bias:
            d_bias = d_bias.at[group].set(b_sum.astype(d_bias.dtype))
        if need_factors:
            d_factors = tuple(d.at[group].set(s.astype(d.dtype)) for d, s in zip(d_factors, factor_sums, strict=True))
        return d_rows, d_weight, d_bias, d_factors

    start = (jnp.zeros((count, inputs), dtype) if need_rows else None,
             jnp.zeros(weight.shape, weight.dtype) if need_weight else None,
             jnp.zeros(bias.shape, bias.dtype) if need_bias else None,
             tuple(jnp.zeros_like(f) for f in factors[:2]) if need_factors else None)
    d_rows, d_weight, d_bias, d_factors = _each_tile(group_sizes, count, tiles, prepare, visit, finish, start)
    if need_factors:
        d_factors = (*d_factors, None)  # no gradient for the scaling
    return d_rows, None if is_packed(weight) else d_weight, None, d_bias, d_factors


_grouped.defvjp(_grouped_fwd, _grouped_bwd, symbolic_zeros=True)
