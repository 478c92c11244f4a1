"""Roofline estimates of gpt-oss-20b's programs compiled for a GPU that is not here: which way the experts run on a
GPU, and whether the Pallas kernels are the GPU's default.

Every program is compiled deviceless for the target (`gptoss_jax.gpu_compile`, default h100) and costed from its
optimized HLO (`gpu_compile.program_cost`): the kernels it launches, their flops and bytes, and a roofline time
(each kernel at the slower of its flops at the target's bf16 matmul rate and its bytes at its bandwidth, plus
2 us a launch). These are estimates from the compiled program, not measurements: benchmarks/gpu_check.sh measures
on a GPU. Data-dependent loops take their counts from balanced routing (every expert gets tokens / experts x 4
pairs), and so do the Pallas kernels' traffic models below.

  moe    one MoE layer's experts (routing excluded), by path: grouped (the XLA loop of `ops.grouped_matmul`),
         gathered (each pair's expert gathered), ragged_dot (`jax.lax.ragged_dot` on the dequantized stack), kernel
         (the Pallas MXFP4 matmul); for prefill (4,096 tokens), a LoRA step (2,048 tokens: forward and backward,
         rank-8 adapters on both expert weights) and decode (batch 1 and 64). `bound` is the time of the work
         itself: its flops at the matmul rate or the MXFP4 weights of the experts it needs at the bandwidth.
  model  the whole model with kernels="xla" and "auto": prefill 4,096, a LoRA step at 2,048 (attention + experts,
         rank 8, remat full), decode steps of batch 1 and 64 against a 4,096-slot cache.
  long   the trainer's LoRA step at 131,072 tokens (configs/train/gpt_oss_20b_lora.py, attention + experts) with
         the long-context settings on and off (model.remat = full | offload, model.moe_tile): memory (`plan
         --target`) and step time; the time to move the offloaded inputs to and from the host is counted at the
         PCIe 5 x16 rate (about 55 GB/s each way) on top of the roofline.

    python benchmarks/gpu_roofline.py [--target h100] [--sections moe,model,long]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from gptoss_jax import gpu_compile

gpu_compile.use_cpu_platform()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from gptoss_jax import backend, lora, ops  # noqa: E402
from gptoss_jax.config import GptOssConfig  # noqa: E402
from gptoss_jax.engine import compiled_steps  # noqa: E402
from gptoss_jax.model import GptOss, LoRAParam  # noqa: E402
from gptoss_jax.moe import run_experts  # noqa: E402
from gptoss_jax.mxfp4 import BLOCK_SIZE, Mxfp4Weight  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = GptOssConfig.gpt_oss_20b()
WORKLOADS = {"prefill 4096": (4096, "forward"), "LoRA step 2048": (2048, "backward"), "decode 1": (1, "forward"),
             "decode 64": (64, "forward")}
PACKED_BYTES = 1 / 2 + 1 / BLOCK_SIZE  # bytes per MXFP4 value: half a byte, and a scale byte per 32


def routed(tokens: int) -> tuple[float, int]:
    """Balanced routing: (pairs per expert, experts with pairs)."""
    pairs = tokens * CONFIG.experts_per_token
    return pairs / CONFIG.num_experts, min(CONFIG.num_experts, pairs)


def loop_trips(tokens: int, blocks: int = 0) -> dict[str, tuple[float, ...]]:
    """Trip counts of the data-dependent loops, by the function that makes them and their depth among its loops:
    the grouped matmul's groups with pairs, then each group's tiles; the blockwise attention's visible key (or
    query) blocks per block, the mean of a banded and a full layer's. (A loop's location names the function that
    made it, or under autodiff the caller of its custom VJP.)"""
    per_expert, present = routed(tokens)
    tiles, visited = max(1.0, per_expert / ops.TILE_ROWS[0]), (2 + (blocks + 1) / 2) / 2
    return {"grouped_matmul": (present, tiles), "_each_tile": (present,), "_each_tile.<locals>.group": (tiles,),
            "blockwise_attention": (visited,), "_blockwise_forward.<locals>.query_block": (visited,),
            "_blockwise_bwd.<locals>.key_block": (visited,)}


def triton_model(tokens: int, calls: list | None = None):
    """The Pallas kernels' flops and bytes: an MXFP4 matmul reads the used row tiles and, once per expert with pairs
    (the row tiles of one expert run together and share its weight slices through L2), that expert's MXFP4 weight;
    attention reads q, k, v and writes its output once per (query block, visible key block) pair's work."""
    per_expert, present = routed(tokens)
    block_m = min(64, max(16, 1 << max(math.ceil(per_expert) - 1, 0).bit_length()))  # as mxfp4_ragged_matmul
    used_rows = present * math.ceil(max(per_expert, 1) / block_m) * block_m

    def cost(name: str, operands: list[list[int]], grid: tuple[int, int, int]) -> tuple[float, float]:
        counted = traffic(name, operands)
        if calls is not None:
            calls.append(counted)
        return counted

    def traffic(name: str, operands: list[list[int]]) -> tuple[float, float]:
        if name in ("_mxfp4_matmul_kernel", "_mxfp4_transposed_kernel"):
            n, k = operands[3][1], operands[3][2] * BLOCK_SIZE  # blocks [G, N, K/32, 16]
            inner = operands[2][1]  # the rows' width: K forward, N backward
            outer = k if name == "_mxfp4_transposed_kernel" else n
            weights = present * n * k * PACKED_BYTES
            return 2.0 * used_rows * n * k, weights + used_rows * (inner * 2 + outer * 4)
        if name == "_decode_attention_kernel":
            batch, kv_heads, length, head_dim = operands[2]
            return 4.0 * batch * kv_heads * 16 * length * head_dim, 2.0 * batch * kv_heads * length * head_dim * 2
        if name.startswith("_flash"):
            batch, heads, length, head_dim = operands[1] if name == "_flash_forward_kernel" else operands[0]
            pairs = length * (128 + length / 2) / 2  # (query, key) pairs of a banded and a full layer, averaged
            passes = 2 if name == "_flash_forward_kernel" else 3
            return 2.0 * passes * batch * heads * pairs * head_dim, 4.0 * batch * heads * length * head_dim * 2
        return 0.0, 0.0

    return cost


def place(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def moe_program(path: str, tokens: int, mode: str, sharding):
    """The experts of one layer as a jitted function and its abstract arguments."""
    e, d, f, k = CONFIG.num_experts, CONFIG.hidden_size, CONFIG.intermediate_size, CONFIG.experts_per_token
    bf16 = jnp.bfloat16
    weights = {"w_gate_up": Mxfp4Weight(jax.ShapeDtypeStruct((e, 2 * f, d // 32, 16), jnp.uint8),
                                        jax.ShapeDtypeStruct((e, 2 * f, d // 32), jnp.uint8)),
               "b_gate_up": jax.ShapeDtypeStruct((e, 2 * f), bf16),
               "w_down": Mxfp4Weight(jax.ShapeDtypeStruct((e, d, f // 32, 16), jnp.uint8),
                                     jax.ShapeDtypeStruct((e, d, f // 32), jnp.uint8)),
               "b_down": jax.ShapeDtypeStruct((e, d), bf16)}
    adapters = {"w_gate_up": (jax.ShapeDtypeStruct((e, d, 8), bf16), jax.ShapeDtypeStruct((e, 8, 2 * f), bf16)),
                "w_down": (jax.ShapeDtypeStruct((e, f, 8), bf16), jax.ShapeDtypeStruct((e, 8, d), bf16))}
    inputs = (jax.ShapeDtypeStruct((tokens, d), bf16), jax.ShapeDtypeStruct((tokens, k), jnp.float32),
              jax.ShapeDtypeStruct((tokens, k), jnp.int32))
    swiglu = dict(alpha=CONFIG.swiglu_alpha, limit=CONFIG.swiglu_limit)

    def experts(x, routing, ids, w, low_rank):
        low_rank = {name: (*pair, 2.0) for name, pair in low_rank.items()}
        if path == "ragged_dot":
            return _ragged_dot_experts(x, routing, ids, w, low_rank, swiglu)
        return run_experts(x, routing, ids, w["w_gate_up"], w["b_gate_up"], w["w_down"], w["b_down"], low_rank,
                                swiglu, "pallas" if path == "kernel" else "xla", path=path)

    if mode == "forward":
        function = jax.jit(lambda x, r, i, w: experts(x, r, i, w, {}))
        arguments = (*inputs, weights)
    else:
        def loss(x, low_rank, r, i, w):
            return jnp.sum(experts(x, r, i, w, low_rank).astype(jnp.float32) ** 2)
        function = jax.jit(jax.grad(loss, argnums=(0, 1)))
        arguments = (inputs[0], adapters, inputs[1], inputs[2], weights)
    return function, place(arguments, sharding)


def _ragged_dot_experts(tokens, weights, experts, w, low_rank, swiglu):
    """The experts through `jax.lax.ragged_dot` on the dequantized weight stacks (adapters merged into them)."""
    k, e = experts.shape[1], w["b_gate_up"].shape[0]
    order = jnp.argsort(experts.reshape(-1), stable=True)
    sizes = jnp.bincount(experts.reshape(-1), length=e).astype(jnp.int32)
    rows = jnp.repeat(tokens, k, axis=0)[order]
    group = jnp.repeat(jnp.arange(e), sizes, total_repeat_length=rows.shape[0])

    def product(x, name, bias):
        dense = w[name].dequantize(x.dtype)  # [E, K, N]
        if name in low_rank:
            a, b, scaling = low_rank[name]
            dense = dense + (scaling * jnp.einsum("ekr,ern->ekn", a, b)).astype(dense.dtype)
        return jax.lax.ragged_dot(x, dense, sizes, preferred_element_type=jnp.float32) + w[bias][group]

    h = ops.clamped_swiglu(product(rows, "w_gate_up", "b_gate_up"), **swiglu).astype(tokens.dtype)
    out = product(h, "w_down", "b_down").astype(tokens.dtype)
    per_pair = jnp.zeros_like(out).at[order].set(out).reshape(tokens.shape[0], k, -1)
    return jnp.einsum("nk,nkd->nd", weights, per_pair.astype(jnp.float32)).astype(tokens.dtype)


def moe_bound(tokens: int, mode: str, gpu) -> float:
    """The time of the work itself: the useful flops at the matmul rate, or the experts' MXFP4 weights it needs
    (those with pairs) read once at the bandwidth."""
    _, present = routed(tokens)
    d, f = CONFIG.hidden_size, CONFIG.intermediate_size
    # backward: the forward and the rows' gradient (the MXFP4 weights are frozen: no gradient of theirs)
    flops = 2.0 * tokens * CONFIG.experts_per_token * (d * 2 * f + f * d) * (2 if mode == "backward" else 1)
    weights = present * (d * 2 * f + f * d) * PACKED_BYTES
    return max(flops / gpu.matmul_flops, weights / gpu.bandwidth)


def model_program(kernels: str, workload: str, sharding):
    """One program of the whole model: prefill, a LoRA train step, or a decode step, as jitted function and
    abstract arguments."""
    tokens, _ = WORKLOADS[workload]
    config = CONFIG.replace(kernels=kernels)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")

    def build():
        model = GptOss(config, dtype="bfloat16", mxfp4_experts=True, rngs=nnx.Rngs(0))
        if workload.startswith("LoRA"):
            lora.add_lora(model, lora.LoraConfig(rank=8, alpha=16.0, targets=targets), rngs=nnx.Rngs(1))
        return model

    model = nnx.eval_shape(build)
    replicated = lambda tree: place(tree, sharding)  # noqa: E731
    if workload.startswith("LoRA"):
        graphdef, adapters, frozen = nnx.split(model, LoRAParam, ...)
        batch = jax.ShapeDtypeStruct((1, tokens), jnp.int32)

        def loss(adapters, frozen, inputs):
            merged = nnx.merge(graphdef, adapters, frozen)
            hidden, _ = merged.hidden_states(inputs, remat="full")
            return jnp.mean(merged.logits(hidden[:, -64:]).astype(jnp.float32))  # the loss's own cost is not the point

        return jax.jit(jax.grad(loss)), replicated((adapters, frozen, batch))
    graphdef, state = nnx.split(model)
    prefill, decode, _ = compiled_steps(graphdef)
    if workload.startswith("prefill"):
        cache = jax.eval_shape(lambda: model.init_cache(jnp.zeros(1, jnp.int32), tokens))
        return prefill, replicated((state, jax.ShapeDtypeStruct((1, tokens), jnp.int32), cache))
    cache = jax.eval_shape(lambda: model.init_cache(jnp.zeros(tokens, jnp.int32), 4096))
    return decode, replicated((state, jax.ShapeDtypeStruct((tokens,), jnp.int32), cache))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="h100", help="h100, h200 or a target config file")
    parser.add_argument("--sections", default="moe,model,long")
    args = parser.parse_args(argv)
    gpu = gpu_compile.target(args.target)
    devices, present = gpu_compile.devices(gpu, 1)
    mesh = jax.make_mesh((1,), ("x",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec())
    print(f"# roofline estimates, compiled for {gpu.description} ({'present' if present else 'deviceless'}), "
          f"jax {jax.__version__}: {gpu.matmul_flops / 1e12:.0f} TFLOP/s bf16, {gpu.bandwidth / 1e12:.2f} TB/s, "
          f"{gpu_compile.LAUNCH_SECONDS * 1e6:.0f} us a launch")
    sections = args.sections.split(",")
    if "moe" in sections:
        print("\n| MoE layer (20b) | path | kernels | GFLOP | GB moved | roofline us | bound us | of bound | "
              "Pallas calls alone: us, of bound |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---|")
        for workload, (tokens, mode) in WORKLOADS.items():
            paths = ["grouped", "ragged_dot", "kernel"] + (["gathered"] if tokens * 4 < CONFIG.num_experts else [])
            for path in paths:
                function, arguments = moe_program(path, tokens, mode, sharding)
                with backend.compiling_for("gpu"):
                    compiled = function.trace(*arguments).lower().compile()
                calls = []
                cost = gpu_compile.program_cost(compiled.as_text(), gpu, trips=loop_trips(tokens),
                                                triton=triton_model(tokens, calls))
                bound = moe_bound(tokens, mode, gpu)
                alone = sum(max(f / gpu.matmul_flops, b / gpu.bandwidth) + gpu_compile.LAUNCH_SECONDS
                            for f, b in calls)
                kernel_only = f"{alone * 1e6:.0f}, {bound / alone:.0%}" if calls else ""
                print(f"| {workload} | {path} | {cost.kernels:.0f} | {cost.flops / 1e9:.1f} | {cost.bytes / 1e9:.3f} "
                      f"| {cost.seconds * 1e6:.0f} | {bound * 1e6:.0f} | {bound / cost.seconds:.0%} | {kernel_only} |",
                      flush=True)
    if "model" in sections:
        print("\n| gpt-oss-20b | kernels | kernels launched | GFLOP | GB moved | roofline ms | compile s |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for workload, (tokens, _) in WORKLOADS.items():
            for kernels in ("xla", "auto"):
                function, arguments = model_program(kernels, workload, sharding)
                start = time.perf_counter()
                with backend.compiling_for("gpu"):
                    compiled = function.trace(*arguments).lower().compile()
                took = time.perf_counter() - start
                blocks = math.ceil(max(tokens, 4096 if workload.startswith("decode") else tokens) / 128)
                cost = gpu_compile.program_cost(compiled.as_text(), gpu, trips=loop_trips(tokens, blocks),
                                                triton=triton_model(tokens))
                print(f"| {workload} | {kernels} | {cost.kernels:.0f} | {cost.flops / 1e9:.0f} | "
                      f"{cost.bytes / 1e9:.2f} | {cost.seconds * 1e3:.2f} | {took:.0f} |", flush=True)
    if "long" in sections:
        long_context(args.target, gpu)
    return 0


HOST_LINK = 55e9  # bytes/s each way between an H100 and pinned host memory (PCIe 5 x16, as measured by others)


def long_context(target: str, gpu) -> None:
    from gptoss_jax.train.config import load_config
    from gptoss_jax.train.plan import plan

    tokens = 131072
    print(f"\n| 20b LoRA step, {tokens:,} tokens | device GiB | host GiB | kernels launched | roofline s | "
          "+ host transfers s |")
    print("|---|---:|---:|---:|---:|---:|")
    for remat, tile in (("full", 0), ("full", 8192), ("offload", 0), ("offload", 8192), ("offload", 16384)):
        config = load_config(ROOT / "configs" / "train" / "gpt_oss_20b_lora.py", [
            "--config.model.checkpoint=", "--config.model.preset=gpt_oss_20b", "--config.optimizer.grad_accum=1",
            f"--config.data.seq_len={tokens}", f"--config.model.remat={remat}", f"--config.model.moe_tile={tile}"])
        report = plan(config, target=target)
        cost = gpu_compile.program_cost(report.program, gpu, trips=loop_trips(tile or tokens),
                                        triton=triton_model(tile or tokens))
        transfers = 2 * report.host_bytes / HOST_LINK
        print(f"| remat={remat}, moe_tile={tile} | {report.total_bytes / 2**30:.1f} | {report.host_bytes / 2**30:.1f} "
              f"| {cost.kernels:.0f} | {cost.seconds:.2f} | {cost.seconds + transfers:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
