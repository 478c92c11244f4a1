"""The shared math of gptoss_jax.ops against independent references: blockwise attention against the dense
attention (outputs and every gradient), the blocks it visits against a brute-force count, and the grouped matmul
against `jax.lax.ragged_dot` (dense and MXFP4 weights, gradients, empty groups, experts nobody chose)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax import ops
from gptoss_jax.mxfp4 import Mxfp4Weight

from helpers import relative_error

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # relative error, as the kernels' tests


def _random(rng, shape, dtype):
    return jnp.asarray(rng.normal(size=shape), dtype)


# T not a multiple of the block, windows shorter than, equal to and longer than a block, GQA groups of 1, 2, 4 and
# 8, packed segments (sorted ids) and unsorted ones (padding ids in the middle of a row)
ATTENTION_CASES = {
    "band_shorter_than_block": (2, 40, 4, 2, 16, 8, 16, "packed"),
    "full_causal_multi_query": (1, 64, 4, 1, 32, None, 16, "packed"),
    "band_over_blocks": (2, 33, 2, 2, 16, 20, 8, "packed"),
    "band_equal_block": (1, 300, 8, 1, 16, 64, 64, "packed"),
    "full_ragged_end": (1, 130, 4, 2, 16, None, 32, "unsorted"),
    "band_one_segment": (2, 96, 4, 2, 16, 16, 16, "one"),
}


def _segments(rng, kind, batch, length):
    if kind == "one":
        return jnp.zeros((batch, length), jnp.int32)
    ids = rng.integers(0, 4, size=(batch, length))
    return jnp.asarray(np.sort(ids, axis=1) if kind == "packed" else ids, jnp.int32)


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_blockwise_attention_matches_the_dense_one(case, dtype):
    batch, length, heads, kv_heads, head_dim, window, block, kind = ATTENTION_CASES[case]
    rng = np.random.default_rng(length)
    q = _random(rng, (batch, length, heads, head_dim), dtype)
    k, v = (_random(rng, (batch, length, kv_heads, head_dim), dtype) for _ in range(2))
    sinks = _random(rng, (heads,), jnp.float32)
    segments = _segments(rng, kind, batch, length)

    def blockwise(q, k, v, sinks):
        return ops.blockwise_attention(q, k, v, sinks, segments, window=window, block=block)

    def dense(q, k, v, sinks):
        return ops.attention_with_sinks(q, k, v, sinks, ops.attention_mask(segments, window))

    out, expected = jax.jit(blockwise)(q, k, v, sinks), dense(q, k, v, sinks)
    assert out.dtype == expected.dtype == dtype
    assert relative_error(out, expected) <= TOLERANCE[dtype]

    cotangent = _random(rng, expected.shape, jnp.float32)  # every output element's gradient counts
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2, 3)))(q, k, v, sinks)
             for f in (blockwise, dense)]
    for name, mine, theirs in zip(("q", "k", "v", "sinks"), *grads, strict=True):
        assert mine.dtype == theirs.dtype, name
        assert np.abs(np.asarray(theirs, np.float32)).max() > 0, name
        assert relative_error(mine, theirs) <= TOLERANCE[dtype], name


def test_blockwise_attention_keeps_to_each_segment():
    """Segments of 8 tokens: each segment's first token sees only itself (and the sink), as the dense path says;
    and the output depends on the keys (replacing one changes it), so the comparison can fail."""
    rng = np.random.default_rng(0)
    q, k, v = (_random(rng, (1, 48, 2, 16), jnp.float32) for _ in range(3))
    sinks = _random(rng, (2,), jnp.float32)
    segments = jnp.asarray(np.repeat(np.arange(6), 8)[None], jnp.int32)
    out = ops.blockwise_attention(q, k, v, sinks, segments, block=16)
    moved = ops.blockwise_attention(q, k.at[0, 20].set(k[0, 3]), v, sinks, segments, block=16)
    assert relative_error(moved, out) > 1e-3
    np.testing.assert_allclose(out[0, ::8], ops.attention_with_sinks(
        q, k, v, sinks, ops.attention_mask(segments, None))[0, ::8], rtol=1e-5)


@pytest.mark.parametrize("length, window, block", [(4096, 128, 128), (1000, 128, 64), (1000, None, 128),
                                                   (512, 300, 32), (64, 1, 16)])
def test_blockwise_attention_visits_exactly_the_blocks_it_needs(length, window, block):
    """The block pairs the loops visit (forward: key blocks per query block; backward: query blocks per key
    block) are exactly those holding at least one causal, in-band (query, key) pair: a banded layer costs
    O(T x window), a causal one half of T^2."""
    band = ops.Band(window, block)
    count = math.ceil(length / block)
    query, key = np.arange(count * block)[:, None], np.arange(count * block)[None, :]
    visible = key <= query
    if window is not None:
        visible &= query - key < window
    needed = visible.reshape(count, block, count, block).any(axis=(1, 3))
    forward = np.zeros_like(needed)
    backward = np.zeros_like(needed)
    for index in range(count):
        first, last = (int(i) for i in band.key_blocks(index))
        forward[index, first:last] = True
        first, last = (int(i) for i in band.query_blocks(index, count))
        backward[first:last, index] = True
    np.testing.assert_array_equal(forward, needed)
    np.testing.assert_array_equal(backward, needed)
    if window is not None and window <= block:
        assert needed.sum() <= 2 * count  # O(T x window): at most two key blocks per query block


# ---- grouped matmul ----------------------------------------------------------------------------------------------


def _ragged_reference(rows, weight, group_sizes, bias):
    out = jax.lax.ragged_dot(rows, weight, group_sizes, preferred_element_type=jnp.float32)
    group = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows.shape[0]), side="right")
    in_a_group = (group < len(group_sizes))[:, None]
    return out + jnp.where(in_a_group, bias.astype(jnp.float32)[jnp.minimum(group, len(group_sizes) - 1)], 0)


# empty groups, groups over and under both tile sizes, rows past the last group (zeros), one group only
GROUPS = [(0, 5, 64, 0, 70), (3, 0, 0, 1, 1), (130, 2, 0, 37, 3), (17, 0, 0, 0, 0), (0, 0, 0, 16, 2)]
TILES = (16, 4)  # small tiles, so the test sizes cross both


@pytest.mark.parametrize("sizes", GROUPS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_grouped_matmul_equals_ragged_dot_with_gradients(sizes, dtype):
    group_sizes = jnp.array(sizes[:-1], jnp.int32)
    count = int(group_sizes.sum()) + sizes[-1]
    rng = np.random.default_rng(sum(sizes))
    rows = _random(rng, (count, 40), dtype)
    weight = _random(rng, (len(group_sizes), 40, 24), dtype)
    bias = _random(rng, (len(group_sizes), 24), dtype)
    out = ops.grouped_matmul(rows, weight, group_sizes, bias, tiles=TILES)
    expected = _ragged_reference(rows, weight, group_sizes, bias)
    assert out.dtype == jnp.float32
    assert relative_error(out, expected) <= TOLERANCE[dtype]
    assert not np.asarray(out[int(group_sizes.sum()):]).any()  # rows past the groups are zeros

    def loss(function):
        return lambda r, w, b: jnp.sum(jnp.sin(function(r, w, group_sizes, b)))

    ours = jax.grad(loss(lambda *a: ops.grouped_matmul(*a, tiles=TILES)), argnums=(0, 1, 2))(rows, weight, bias)
    theirs = jax.grad(loss(_ragged_reference), argnums=(0, 1, 2))(rows, weight, bias)
    for name, mine, reference in zip(("rows", "weight", "bias"), ours, theirs, strict=True):
        assert mine.dtype == reference.dtype, name
        if np.abs(np.asarray(reference, np.float32)).max() > 0:
            assert relative_error(mine, reference) <= TOLERANCE[dtype], name
        else:
            assert not np.asarray(mine, np.float32).any(), name


@pytest.mark.parametrize("sizes", GROUPS[:3])
def test_grouped_matmul_on_mxfp4_weights(sizes):
    """Packed weights give the product of their dequantized values, and gradients for the rows and bias."""
    group_sizes = jnp.array(sizes[:-1], jnp.int32)
    rng = np.random.default_rng(len(sizes))
    rows = _random(rng, (int(group_sizes.sum()) + sizes[-1], 64), jnp.float32)
    packed = Mxfp4Weight.quantize(_random(rng, (len(group_sizes), 64, 24), jnp.float32))
    dense = packed.dequantize(jnp.float32)
    bias = _random(rng, (len(group_sizes), 24), jnp.float32)
    assert relative_error(ops.grouped_matmul(rows, packed, group_sizes, bias, tiles=TILES),
                          _ragged_reference(rows, dense, group_sizes, bias)) <= 1e-5

    def loss(function, weight):
        return lambda r, b: jnp.sum(jnp.sin(function(r, weight, group_sizes, b)))

    ours = jax.grad(loss(lambda *a: ops.grouped_matmul(*a, tiles=TILES), packed), argnums=(0, 1))(rows, bias)
    theirs = jax.grad(loss(_ragged_reference, dense), argnums=(0, 1))(rows, bias)
    for mine, reference in zip(ours, theirs, strict=True):
        assert relative_error(mine, reference) <= 1e-5


def test_grouped_matmul_never_reads_experts_without_rows():
    """Weights of experts nobody chose may be anything (here NaN, and MXFP4 scales that decode to inf): they are
    never made dense, so the product stays finite — the loop reads only the experts in use."""
    rng = np.random.default_rng(3)
    group_sizes = jnp.array([0, 9, 0, 4], jnp.int32)
    rows = _random(rng, (13, 64), jnp.float32)
    weight = _random(rng, (4, 64, 24), jnp.float32)
    poisoned = weight.at[jnp.array([0, 2])].set(jnp.nan)
    expected = _ragged_reference(rows, weight, group_sizes, jnp.zeros((4, 24)))
    assert relative_error(ops.grouped_matmul(rows, poisoned, group_sizes, tiles=TILES), expected) <= 1e-5
    packed = Mxfp4Weight.quantize(weight)
    poisoned = Mxfp4Weight(packed.blocks, packed.scales.at[jnp.array([0, 2])].set(255))
    out = ops.grouped_matmul(rows, poisoned, group_sizes, tiles=TILES)
    assert np.isfinite(np.asarray(out)).all()
    assert relative_error(out, ops.grouped_matmul(rows, packed, group_sizes, tiles=TILES)) == 0


def test_grouped_matmul_reads_a_layer_of_a_stack_in_place():
    """An `Mxfp4Layer` (what the layer loop hands the experts) gives the product of its layer's weights."""
    from gptoss_jax.mxfp4 import Mxfp4Layer

    rng = np.random.default_rng(4)
    stack = Mxfp4Weight.quantize(_random(rng, (3, 4, 64, 24), jnp.float32))
    group_sizes = jnp.array([5, 0, 20, 3], jnp.int32)
    rows = _random(rng, (28, 64), jnp.float32)
    for layer in range(3):
        view = Mxfp4Layer(stack, jnp.int32(layer))
        expected = ops.grouped_matmul(rows, Mxfp4Weight(stack.blocks[layer], stack.scales[layer]), group_sizes)
        assert view.shape == (4, 64, 24)
        np.testing.assert_array_equal(ops.grouped_matmul(rows, view, group_sizes, tiles=TILES), expected)


@pytest.mark.parametrize("spec, x_shape, w_shape", [
    ("btd,dnh->btnh", (2, 5, 16), (16, 3, 8)),
    ("btnh,nhd->btd", (2, 5, 3, 8), (3, 8, 16)),
    ("...d,vd->...v", (1, 1, 16), (40, 16)),  # one row: on a CPU, multiplied beside a copy of itself in bf16
    ("btd,dr->btr", (1, 1, 16), (16, 4)),
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_matmul_and_its_gradients_equal_einsum(spec, x_shape, w_shape, dtype):
    rng = np.random.default_rng(len(spec))
    x, w = _random(rng, x_shape, dtype), _random(rng, w_shape, dtype)
    expected = jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32))
    out = ops.matmul(spec, x, w)
    assert out.dtype == dtype and relative_error(out, expected) <= TOLERANCE[dtype]
    cotangent = _random(rng, expected.shape, jnp.float32)
    ours = jax.grad(lambda x, w: jnp.sum(ops.matmul(spec, x, w).astype(jnp.float32) * cotangent), (0, 1))(x, w)
    theirs = jax.grad(lambda x, w: jnp.sum(jnp.einsum(spec, x, w) * cotangent), (0, 1))(
        x.astype(jnp.float32), w.astype(jnp.float32))
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.dtype == dtype and relative_error(mine, reference) <= TOLERANCE[dtype]
