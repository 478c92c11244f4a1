"""How the experts of a mixture-of-experts layer run: the strategies and the kernel dispatch behind `model.MoE`.

`run_experts` computes the (token, expert) pairs of one layer, weighted and summed per token, by one of four
paths (`_experts_path` chooses): the Pallas MXFP4 kernel, every expert on every token (small dense work), each
pair's expert gathered (decoding), or the pairs sorted by expert into one group each of `ops.grouped_matmul`.
`expert_parallel` runs it under shard_map with the experts split over the mesh, and `in_tiles` a tile of tokens
at a time. `router_losses` are the auxiliary losses of the routing. The architecture itself — parameters,
routing, the layer — is `model.MoE`.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gptoss_jax import backend, ops, sharding
from gptoss_jax.kernels.mxfp4_matmul import mxfp4_ragged_matmul
from gptoss_jax.mxfp4 import BLOCK_SIZE, Mxfp4Layer, Mxfp4Weight, expert_products, is_packed

log = logging.getLogger(__name__)


def in_tiles(experts_of, tile: int, tokens: jax.Array, weights: jax.Array, experts: jax.Array,
              num_experts: int) -> jax.Array:
    """`experts_of(tokens, weights, experts)` a tile of `tile` tokens at a time, each tile recomputed in the backward
    pass (GptOssConfig.moe_tile): what a tile's pairs make lives only while that tile runs. All at once when `tile`
    is 0 or covers the tokens. The last tile is padded with tokens routed nowhere (expert id `num_experts`, the id
    of a pair handled elsewhere, weight 0)."""
    count = tokens.shape[0]
    if not tile or count <= tile:
        return experts_of(tokens, weights, experts)
    pad = -count % tile

    def tiles(a, fill):
        return jnp.pad(a, ((0, pad), (0, 0)), constant_values=fill).reshape(-1, tile, a.shape[-1])

    each = jax.checkpoint(lambda tile_args: experts_of(*tile_args))
    out = jax.lax.map(each, (tiles(tokens, 0), tiles(weights, 0), tiles(experts, num_experts)))
    return out.reshape(-1, tokens.shape[-1])[:count]


def run_experts(tokens, weights, experts, w_gate_up, b_gate_up, w_down, b_down, low_rank, swiglu,
                     kernels="xla", path: str | None = None):
    """The experts' outputs for (token, expert) pairs, weighted and summed per token.

    tokens [N, D], weights and experts [N, k]; an expert id equal to the number of experts here marks a pair
    handled elsewhere (expert parallelism): it has weight 0. w_gate_up / w_down: dense or MXFP4 weights.
    low_rank: LoRA factors (a, b, scaling) of "w_gate_up" / "w_down", one per expert.

    A decode step of a small model with dense weights runs every expert on every token (`_every_expert`, see
    EVERY_EXPERT_TOKENS). Fewer pairs than experts (decoding): each pair multiplies by its own expert's gathered
    weights (`_gathered_experts`), so a step reads k experts per token. Otherwise the pairs are sorted by expert and
    each expert's rows form one group of a grouped matmul (`ops.grouped_matmul`: one expert's weight dense at a
    time, experts without pairs never read, the adapters' products inside the same loop). Tokens reach their
    rows and results come back by gathers with the sort order and its inverse, in both directions of autodiff
    (`_permute`): no scatter of every pair. With the Pallas kernel (`kernels`, packed weights) the matmuls
    dequantize tiles as they go, bias and SwiGLU fused (SwiGLU only without a gate-up adapter, whose update
    comes before it). `_experts_path` chooses among these; `path` forces one (benchmarks/gpu_roofline.py compares
    them).
    """
    num_tokens, k = experts.shape
    num_experts = b_gate_up.shape[0]
    path = path or _experts_path(kernels, w_gate_up, num_tokens, k, num_experts)
    kernel = _expert_kernel() if path == "kernel" else None
    if path == "every":
        return _every_expert(tokens, weights, experts, w_gate_up, b_gate_up, w_down, b_down, low_rank, swiglu)
    if path == "gathered":
        return _gathered_experts(tokens, weights, experts, w_gate_up, b_gate_up, w_down, b_down, low_rank, swiglu)
    flat_experts = experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    inverse = jnp.argsort(order)
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)  # pairs not here: no group
    rows = _permute(jnp.repeat(tokens, k, axis=0), order, inverse)

    def matmul(x, weight, bias, name):
        adapter = ops.LowRank(*low_rank[name]) if name in low_rank else None
        if kernel is None:
            return ops.grouped_matmul(x, weight, group_sizes, bias, adapter, out_dtype=tokens.dtype)
        if adapter is None:
            return kernel(x, weight, group_sizes, bias, out_dtype=x.dtype)
        # the kernel takes no adapter: its two thin products go through XLA, added before the one rounding
        return kernel(x, weight, group_sizes, bias) + ops.grouped_low_rank(x, adapter, group_sizes)

    if kernel is not None and "w_gate_up" not in low_rank:
        h = kernel(rows, w_gate_up, group_sizes, b_gate_up, swiglu=(swiglu["alpha"], swiglu["limit"]),
                   out_dtype=tokens.dtype)
    else:
        h = ops.clamped_swiglu(matmul(rows, w_gate_up, b_gate_up, "w_gate_up").astype(jnp.float32), **swiglu)
    out = matmul(h.astype(tokens.dtype), w_down, b_down, "w_down").astype(tokens.dtype)
    per_pair = _permute(out, inverse, order).reshape(num_tokens, k, -1)
    return jnp.einsum("nk,nkd->nd", weights.astype(jnp.float32), per_pair,
                      preferred_element_type=jnp.float32).astype(tokens.dtype)


@jax.custom_vjp
def _permute(x: jax.Array, permutation: jax.Array, inverse: jax.Array) -> jax.Array:
    """x[permutation], whose gradient is the gather by the inverse permutation (autodiff would scatter-add)."""
    return x[permutation]


def _permute_fwd(x, permutation, inverse):
    return x[permutation], inverse


def _permute_bwd(inverse, grad):
    return grad[inverse], None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def _gathered_experts(tokens, weights, experts, w_gate_up, b_gate_up, w_down, b_down, low_rank, swiglu):
    """`run_experts` for fewer pairs than experts: every pair multiplies by its own expert's weights,
    gathered (and for MXFP4 only those dequantized). Each pair is a matrix-vector product, done in float32 —
    the same values (dequantized weights are exact in any float type) with the accumulation the model's
    matmuls use anyway — because a CPU runs one-row bfloat16 products an order of magnitude slower."""
    ids = jnp.minimum(experts, b_gate_up.shape[0] - 1)  # pairs handled elsewhere have weight 0

    def times_weight(x, weight):
        if is_packed(weight):  # on a CPU decoded a few rows at a time, never whole (mxfp4.expert_products)
            return expert_products(x.reshape(-1, x.shape[-1]), weight, ids.reshape(-1),
                                   whole=backend.on_gpu()).reshape(*ids.shape, -1)
        return jnp.einsum("nki,nkio->nko", x, weight[ids].astype(jnp.float32))

    def product(x, weight, bias, name):
        out = times_weight(x, weight) + bias[ids].astype(jnp.float32)
        if name in low_rank:
            a, b, scaling = low_rank[name]
            inner = jnp.einsum("nki,nkir->nkr", x, a[ids].astype(jnp.float32))
            out += jnp.einsum("nkr,nkro->nko", inner, b[ids].astype(jnp.float32)) * scaling
        return out

    def rounded(x):  # to the model dtype where the grouped path rounds, so both give the same values
        return x.astype(tokens.dtype).astype(jnp.float32)

    rows = jnp.broadcast_to(tokens.astype(jnp.float32)[:, None], (*ids.shape, tokens.shape[-1]))
    h = ops.clamped_swiglu(rounded(product(rows, w_gate_up, b_gate_up, "w_gate_up")), **swiglu)
    out = rounded(product(rounded(h), w_down, b_down, "w_down"))
    return jnp.einsum("nk,nkd->nd", weights.astype(jnp.float32), out).astype(tokens.dtype)


# A decode step's few tokens of a small model (at most this many tokens, and multiply-adds: tokens x the gate-up
# weight's size, well under a millisecond of matmul) run every dense expert on every token rather than route:
# the grouped loop's fixed cost per expert would be most of the step (5.7 ms against 0.7 ms for 16 tokens of the
# benchmarks' small model). Up to GATHERED_PAIRS_PER_EXPERT pairs an expert, gathering each pair's expert reads
# less than that and wins: a decode step of the inference benchmark's model (16 experts, top 4) took 26 / 71 /
# 133 ms gathered against 98 / 144 / 166 ms every expert at 1 / 4 / 8 rows, and 267 against 199 ms at 16.
EVERY_EXPERT_TOKENS = 64
GATHERED_PAIRS_PER_EXPERT = 2


EVERY_EXPERT_WORK = 2**26


def _every_expert(tokens, weights, experts, w_gate_up, b_gate_up, w_down, b_down, low_rank, swiglu):
    """`run_experts` for little work and dense weights: each expert on every token, in two batched matmuls,
    then each token's chosen experts' outputs weighted (the others weigh 0). Rounded where the grouped path rounds,
    so both give the same values."""
    count, num_experts = experts.shape[0], b_gate_up.shape[0]
    dtype = tokens.dtype
    # [N, E] routing weight of each expert (0 where not chosen; ids past the last expert are handled elsewhere)
    mix = jnp.zeros((count, num_experts), jnp.float32).at[jnp.arange(count)[:, None], experts].add(
        weights.astype(jnp.float32), mode="drop")

    def product(x, weight, bias, name):  # x [E, N, K] (every expert's rows: a batched matmul on stored weights)
        out = jnp.einsum("enk,ekf->enf", x, weight.astype(dtype), preferred_element_type=jnp.float32)
        out += bias.astype(jnp.float32)[:, None]
        if name in low_rank:
            a, b, scaling = low_rank[name]
            inner = jnp.einsum("enk,ekr->enr", x, a.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
            out += scaling * jnp.einsum("enr,erf->enf", inner, b.astype(dtype), preferred_element_type=jnp.float32)
        return out.astype(dtype)

    rows = jnp.broadcast_to(tokens, (num_experts, *tokens.shape))
    h = ops.clamped_swiglu(product(rows, w_gate_up, b_gate_up, "w_gate_up").astype(jnp.float32), **swiglu)
    out = product(h.astype(dtype), w_down, b_down, "w_down")
    return jnp.einsum("ne,end->nd", mix, out.astype(jnp.float32)).astype(dtype)


def _experts_path(kernels: str, w_gate_up, num_tokens: int, k: int, num_experts: int) -> str:
    """How the experts run: "kernel" (the Pallas MXFP4 grouped matmul: packed weights and kernels asked for),
    "every" (every expert on every token), "gathered" (each pair times its own expert's gathered weights) or
    "grouped" (pairs sorted by expert, one group of `ops.grouped_matmul` per expert). `run_experts` says what
    each costs; the thresholds were set by measurement on a CPU (benchmarks/RESULTS.md)."""
    if is_packed(w_gate_up) and backend.use_kernels(kernels):
        return "kernel"
    pairs = num_tokens * k
    if is_packed(w_gate_up):  # gathering dequantizes a pair's expert: fewer pairs than experts only
        return "gathered" if pairs < num_experts else "grouped"
    if pairs <= GATHERED_PAIRS_PER_EXPERT * num_experts:
        return "gathered"
    if num_tokens <= EVERY_EXPERT_TOKENS and num_tokens * w_gate_up.size <= EVERY_EXPERT_WORK:
        return "every"
    return "grouped"


def _expert_kernel():
    """The Pallas MXFP4 matmul, for packed weights. Logs the choice each time a forward is traced."""
    log.info("MoE experts: Pallas MXFP4 kernel%s", backend.interpret_note())

    def kernel(rows, weight, *args, **kwargs):
        return mxfp4_ragged_matmul(rows, weight, *args, interpret=not backend.on_gpu(), **kwargs)

    return kernel


def router_losses(logits: jax.Array, experts: jax.Array) -> jax.Array:
    """[z-loss, load-balancing loss] of one layer's routing: the mean squared log-partition of the router
    logits, and E * sum_e (share of assignments to e) * (mean router probability of e), 1 when balanced."""
    num_experts = logits.shape[-1]
    z_loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    share = jnp.bincount(experts.reshape(-1), length=num_experts) / experts.size
    balance = num_experts * jnp.sum(share * jax.nn.softmax(logits, axis=-1).mean(axis=0))
    return jnp.stack([z_loss, balance])


def dense(weight: jax.Array | Mxfp4Weight | Mxfp4Layer, dtype) -> jax.Array:
    weight = layer_weight(weight)
    return weight.dequantize(dtype) if isinstance(weight, Mxfp4Weight) else weight.astype(dtype)


def layer_weight(weight):
    """An expert weight as an array or `Mxfp4Weight`: an `Mxfp4Layer` is sliced out of its stack (a copy)."""
    return weight.whole() if isinstance(weight, Mxfp4Layer) else weight


def expert_parallel(mesh, tokens: jax.Array, weights: jax.Array, experts: jax.Array, w_gate_up, b_gate_up, w_down,
                    b_down, low_rank, swiglu, kernels: str) -> jax.Array:
    """`run_experts` with the experts split over the mesh's `expert` axis (and their intermediate dimension over
    `tensor`, where whole gate/linear pairs and MXFP4 blocks split), under shard_map: every device routes its
    tokens' pairs to the experts it holds, computes them, and one psum over (expert, tensor) adds the partial
    outputs. Parameters sharded over fsdp are gathered first."""
    packed = is_packed(w_gate_up)
    ways, intermediate = mesh.shape["tensor"], b_gate_up.shape[-1] // 2
    splits = ways > 1 and intermediate % ways == 0 and not (packed and (intermediate // BLOCK_SIZE) % ways)
    expert, tensor = "expert", ("tensor" if splits else None)
    rows = PartitionSpec(*sharding.batch_spec(tokens.shape[0], mesh), None)
    params = {  # a layer of a stack is sliced out here: each device then holds (and copies) only its experts
        "w_gate_up": layer_weight(w_gate_up), "b_gate_up": b_gate_up, "w_down": layer_weight(w_down),
        "b_down": b_down, "low_rank": low_rank,
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
                     for name in low_rank},
    }

    def local(tokens, weights, experts, params):
        here = params["b_gate_up"].shape[0]
        local_ids = experts - jax.lax.axis_index(expert) * here
        mine = (local_ids >= 0) & (local_ids < here)
        b_down = params["b_down"]
        if tensor:  # the intermediate is split: add the down projection's bias on one tensor shard only
            b_down = b_down * (jax.lax.axis_index(tensor) == 0)
        out = run_experts(tokens, jnp.where(mine, weights, 0.0), jnp.where(mine, local_ids, here),
                          params["w_gate_up"], params["b_gate_up"], params["w_down"], b_down, params["low_rank"],
                          swiglu, kernels)
        return jax.lax.psum(out, (expert, tensor) if tensor else expert)

    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, specs), out_specs=rows,
                         check_vma=False)(tokens, weights, experts, params)
