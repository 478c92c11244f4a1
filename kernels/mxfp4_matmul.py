"""The experts' MXFP4 grouped (ragged) matmul as a Pallas kernel, on the checkpoint's own layout.

rows [M, K] sorted by expert, with `group_sizes` [G] rows per expert, times each expert's weight [K, N] stored as
MXFP4 (`Mxfp4Weight`: blocks [G, N, K/32, 16] uint8 + scales [G, N, K/32] uint8, the 32-value blocks running along
K). Each grid step is one (row tile, column tile): it walks K a `block_k` slice at a time, dequantizes just that
[block_n, block_k] slice of its expert's weight (the same bit-exact decoding as `mxfp4.dequantize_rows`) and
accumulates in float32; the expert's bias and, optionally, the clamped SwiGLU of gpt-oss are applied before the
tile is written. The weights are never expanded in memory.

Rows are laid out as in `group_tiles`: every group padded to whole row tiles, each tile belonging to one group;
tiles past the last used one are skipped (their output is not written). A custom VJP gives the gradients of the
rows (and the bias) through the frozen packed weights — a second kernel multiplies by the transposed weight,
dequantized the same way — so LoRA trains on an MXFP4 base. A layer of a stack of weights is read in place.

Written as generic Pallas (BlockSpecs, ref slices, jnp inside the kernel), which `interpret=True` runs on a CPU
and a GPU compiles with the lowering `kernels.lowering` chooses; `reference` is the XLA computation it must equal.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gptoss_jax.kernels.lowering import compiler_params
from gptoss_jax.mxfp4 import BLOCK_SIZE, Mxfp4Layer, Mxfp4Weight, dequantize_rows
from gptoss_jax.ops import clamped_swiglu, grouped_matmul


class Layout(NamedTuple):
    """Where each row goes when every group is padded to whole tiles."""

    destination: jax.Array  # [M] row index in the tiled array (tiles * tile for rows outside every group)
    valid: jax.Array  # [M] the row belongs to a group
    tile_group: jax.Array  # [tiles] the group of each tile
    used_tiles: jax.Array  # tiles holding rows; the rest are padding
    tiles: int  # static upper bound: M // tile + min(G, M)


def group_tiles(group_sizes: jax.Array, count: int, tile: int) -> Layout:
    """The tiled layout of `count` rows sorted into groups of `group_sizes`."""
    groups = group_sizes.shape[0]
    tiles = count // tile + min(groups, count)  # enough for any group sizes: a partial tile per group with rows
    padded = (group_sizes + tile - 1) // tile * tile
    ends, padded_ends = jnp.cumsum(group_sizes), jnp.cumsum(padded)
    index = jnp.arange(count)
    # compare_all: one fused comparison against the few group ends, where the default binary search is a loop
    # of small kernels on a GPU
    group = jnp.searchsorted(ends, index, side="right", method="compare_all")
    valid = group < groups
    group = jnp.minimum(group, groups - 1)
    destination = jnp.where(valid, (padded_ends - padded)[group] + index - (ends - group_sizes)[group], tiles * tile)
    tile_group = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(tiles) * tile, side="right",
                                              method="compare_all"), groups - 1)
    return Layout(destination, valid, tile_group.astype(jnp.int32), (padded_ends[-1] // tile).astype(jnp.int32),
                  tiles)


class Options(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    swiglu: tuple[float, float] | None  # (alpha, limit), or None for no epilogue
    interpret: bool
    out_dtype: str = "float32"  # of the forward's result (summed in float32 whatever it is)


def _block(size: int, choices: tuple[int, ...]) -> int:
    for choice in choices:
        if size % choice == 0:
            return choice
    raise ValueError(f"no tile in {choices} divides {size}")


def mxfp4_ragged_matmul(rows: jax.Array, weight: Mxfp4Weight | Mxfp4Layer, group_sizes: jax.Array,
                        bias: jax.Array | None = None, *, swiglu: tuple[float, float] | None = None,
                        block_m: int | None = None, out_dtype=jnp.float32, interpret: bool = False) -> jax.Array:
    """rows [M, K] (sorted by group) times their group's MXFP4 weight, plus the group's bias [G, N], then the
    clamped SwiGLU (alpha, limit) if given -> [M, N] (or [M, N/2] after SwiGLU) in `out_dtype` (summed in float32,
    rounded once: a bf16 model asks for bf16 and moves half the bytes). Rows past the groups
    give zeros. Differentiable in `rows` and `bias`. A layer of a stack (`Mxfp4Layer`) is read in place, not
    copied out of the stack first.

    block_m: rows per tile; by default the rows a group has on average, as a power of two from 16 (Triton's
    smallest) to 64: a decode step's few rows per expert then multiply in 16-row tiles, not 64 mostly empty ones."""
    count, k = rows.shape
    groups, n = weight.shape[0], weight.shape[-1]
    if block_m is None:
        block_m = min(64, max(16, 1 << max(-(-count // groups) - 1, 0).bit_length()))
    if weight.shape[-2] != k or group_sizes.shape != (groups,):
        raise ValueError(f"rows {rows.shape}, weight {weight.shape} and group_sizes {group_sizes.shape} disagree")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two of at least 16, got {block_m}")
    options = Options(block_m, _block(n, (128, 64, 32)), _block(k, (256, 128, 64, 32)), swiglu, interpret,
                      jnp.dtype(out_dtype).name)
    bias = jnp.zeros((groups, n), jnp.float32) if bias is None else bias
    layout = group_tiles(group_sizes, count, block_m)
    tiled = jnp.zeros((layout.tiles * block_m, k), rows.dtype).at[layout.destination].set(rows, mode="drop")
    if isinstance(weight, Mxfp4Layer):  # a layer of a stack: the kernel reads the stack, flattened over layers
        blocks, scales = (a.reshape(-1, *a.shape[2:]) for a in (weight.stack.blocks, weight.stack.scales))
        first = weight.layer * groups
    else:
        blocks, scales, first = weight.blocks, weight.scales, 0
    counts = jnp.stack([layout.used_tiles, jnp.asarray(first, jnp.int32)])
    out = _tiled_matmul(tiled, blocks, scales, bias, layout.tile_group, counts, options)
    gathered = out.at[layout.destination].get(mode="fill", fill_value=0)
    return jnp.where(layout.valid[:, None], gathered, 0)


def reference(rows: jax.Array, weight: Mxfp4Weight, group_sizes: jax.Array, bias: jax.Array | None = None,
              *, swiglu: tuple[float, float] | None = None) -> jax.Array:
    """The same product through XLA: the model's grouped matmul, then SwiGLU."""
    out = grouped_matmul(rows, weight, group_sizes, bias)
    return out if swiglu is None else clamped_swiglu(out, *swiglu)


# ---- the kernels ------------------------------------------------------------------------------------------------


def _weight_slice(blocks_ref, scales_ref, group, n_start, k_start, options: Options, dtype) -> jax.Array:
    """[block_n, block_k] of one expert's weight (output-major), dequantized."""
    per_k = options.block_k // BLOCK_SIZE
    blocks = blocks_ref[group, pl.ds(n_start, options.block_n), pl.ds(k_start // BLOCK_SIZE, per_k), :]
    scales = scales_ref[group, pl.ds(n_start, options.block_n), pl.ds(k_start // BLOCK_SIZE, per_k)]
    return dequantize_rows(blocks, scales, dtype)


def _used_tiles_only(tile_group_ref, counts_ref, out_ref, compute) -> None:
    """Writes compute(group) for a tile holding rows of `group`. Padding tiles (past the used ones) are skipped
    and their output left unwritten: nothing reads it (`mxfp4_ragged_matmul` gathers the rows of used tiles, and
    the backward masks it), and writing zeros there would cost a decode step as much bandwidth as its weights."""
    tile = pl.program_id(0)

    @pl.when(tile < counts_ref[0])
    def _():
        out_ref[...] = compute(tile_group_ref[tile]).astype(out_ref.dtype)


def _mxfp4_matmul_kernel(tile_group_ref, counts_ref, rows_ref, blocks_ref, scales_ref, bias_ref, out_ref, *,
                         options: Options):
    n_start = pl.program_id(1) * options.block_n

    def compute(group):
        def step(index, accumulator):
            k_start = index * options.block_k
            x = rows_ref[:, pl.ds(k_start, options.block_k)]
            w = _weight_slice(blocks_ref, scales_ref, group + counts_ref[1], n_start, k_start, options, x.dtype)
            return accumulator + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                                     preferred_element_type=jnp.float32)

        steps = rows_ref.shape[1] // options.block_k
        accumulator = jax.lax.fori_loop(0, steps, step, jnp.zeros((options.block_m, options.block_n), jnp.float32))
        accumulator += bias_ref[group, pl.ds(n_start, options.block_n)].astype(jnp.float32)[None, :]
        return accumulator if options.swiglu is None else clamped_swiglu(accumulator, *options.swiglu)

    _used_tiles_only(tile_group_ref, counts_ref, out_ref, compute)


def _mxfp4_transposed_kernel(tile_group_ref, counts_ref, grads_ref, blocks_ref, scales_ref, out_ref, *,
                             options: Options):
    """d rows = d out @ weight^T for one (row tile, K slice), walking N."""
    k_start = pl.program_id(1) * options.block_k

    def compute(group):
        def step(index, accumulator):
            n_start = index * options.block_n
            g = grads_ref[:, pl.ds(n_start, options.block_n)]
            w = _weight_slice(blocks_ref, scales_ref, group + counts_ref[1], n_start, k_start, options, g.dtype)
            return accumulator + jnp.dot(g, w, preferred_element_type=jnp.float32)

        steps = grads_ref.shape[1] // options.block_n
        return jax.lax.fori_loop(0, steps, step, jnp.zeros((options.block_m, options.block_k), jnp.float32))

    _used_tiles_only(tile_group_ref, counts_ref, out_ref, compute)


def _whole(array: jax.Array) -> pl.BlockSpec:
    """The whole array in every grid step (sliced inside the kernel, where the tile's group is known)."""
    return pl.BlockSpec(array.shape, lambda *_: (0,) * array.ndim)


def _forward(tiled, blocks, scales, bias, tile_group, counts, options: Options):
    rows, k = tiled.shape
    n = blocks.shape[1]
    width = n // 2 if options.swiglu is not None else n
    out_block = options.block_n // 2 if options.swiglu is not None else options.block_n
    return pl.pallas_call(
        functools.partial(_mxfp4_matmul_kernel, options=options),
        grid=(rows // options.block_m, n // options.block_n),
        in_specs=[_whole(tile_group), _whole(counts), pl.BlockSpec((options.block_m, k), lambda i, j: (i, 0)),
                  _whole(blocks), _whole(scales), _whole(bias)],
        out_specs=pl.BlockSpec((options.block_m, out_block), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((rows, width), options.out_dtype),
        interpret=options.interpret,
        compiler_params=compiler_params(options.interpret),
    )(tile_group, counts, tiled, blocks, scales, bias)


def _transposed(grads, blocks, scales, tile_group, counts, options: Options, dtype):
    rows, n = grads.shape
    k = blocks.shape[2] * BLOCK_SIZE
    return pl.pallas_call(
        functools.partial(_mxfp4_transposed_kernel, options=options),
        grid=(rows // options.block_m, k // options.block_k),
        in_specs=[_whole(tile_group), _whole(counts), pl.BlockSpec((options.block_m, n), lambda i, j: (i, 0)),
                  _whole(blocks), _whole(scales)],
        out_specs=pl.BlockSpec((options.block_m, options.block_k), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((rows, k), dtype),
        interpret=options.interpret,
        compiler_params=compiler_params(options.interpret),
    )(tile_group, counts, grads, blocks, scales)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _tiled_matmul(tiled, blocks, scales, bias, tile_group, counts, options: Options):
    """counts: int32 [2], the tiles in use and the index in `blocks` of group 0's weight (a layer's experts, in a
    stack of layers flattened to [layers x experts, ...])."""
    return _forward(tiled, blocks, scales, bias, tile_group, counts, options)


def _tiled_matmul_forward(tiled, blocks, scales, bias, tile_group, counts, options: Options):
    out = _forward(tiled, blocks, scales, bias, tile_group, counts, options)
    return out, (tiled, blocks, scales, bias, tile_group, counts)


def _tiled_matmul_backward(options: Options, residuals, grad_out):
    tiled, blocks, scales, bias, tile_group, counts = residuals
    in_used_tile = (jnp.arange(tiled.shape[0]) // options.block_m < counts[0])[:, None]  # the rest: never written
    grad_out = jnp.where(in_used_tile, grad_out.astype(jnp.float32), 0)
    if options.swiglu is not None:  # back through the epilogue, from the recomputed pre-activation
        before = jnp.where(in_used_tile, _forward(tiled, blocks, scales, bias, tile_group, counts,
                                                  options._replace(swiglu=None, out_dtype="float32")), 0)
        grad_out = jax.vjp(lambda h: clamped_swiglu(h, *options.swiglu), before)[1](grad_out)[0]
    grad_rows = _transposed(grad_out.astype(tiled.dtype), blocks, scales, tile_group, counts, options, tiled.dtype)
    per_tile = grad_out.reshape(-1, options.block_m, grad_out.shape[-1]).sum(axis=1)  # padding rows carry zeros
    grad_bias = jax.ops.segment_sum(per_tile, tile_group, num_segments=bias.shape[0])
    return grad_rows, None, None, grad_bias.astype(bias.dtype), None, None


_tiled_matmul.defvjp(_tiled_matmul_forward, _tiled_matmul_backward)
