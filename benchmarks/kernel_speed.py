"""The Pallas kernels against the XLA paths at gpt-oss layer shapes, with the device's copy bandwidth and bf16
matmul rate measured in the same run as the ceilings:
- the MXFP4 experts (XLA: dequantize, then ragged_dot / gathered experts): the whole expert computation of one
  layer (gate-up with SwiGLU, down, bias, weighting) for `tokens` tokens routed to 4 experts each;
- flash attention with sinks, forward + backward, on a full causal layer of `attention-tokens` tokens (XLA: the
  model's blockwise attention);
- decode attention of `decode-batch` new tokens over a `cache`-slot KV cache.

    python benchmarks/kernel_speed.py                         # gpt-oss-20b layer: decode 1-64 tokens, prefill 4k-16k
    python benchmarks/kernel_speed.py --preset gpt_oss_120b
    python benchmarks/kernel_speed.py --small --tokens 1,64 --attention-tokens 128 --decode-batch 1 --cache 256
                                                          # tiny shapes, interpret mode: a smoke run on a CPU

Decode moves the touched experts' packed bytes (reported as GB/s against the copy ceiling); prefill is compute
(TFLOP/s against the matmul ceiling). Off a GPU the kernel runs in interpret mode, so only a GPU's figures mean
anything.
"""

import argparse
import platform

import jax
import jax.numpy as jnp
import numpy as np
from timing import seconds

from gptoss_jax.config import GptOssConfig
from gptoss_jax.moe import run_experts
from gptoss_jax.mxfp4 import Mxfp4Weight


def ceilings(size_bytes: int, matmul: int) -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s) on the default device."""
    source = jnp.ones((size_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1)
    copy_seconds = seconds(lambda: copy(source).block_until_ready(), 5)
    a = jnp.ones((matmul, matmul), jnp.bfloat16)
    product = jax.jit(lambda a: a @ a)
    matmul_seconds = seconds(lambda: product(a).block_until_ready(), 5)
    return 2 * size_bytes / copy_seconds / 1e9, 2 * matmul**3 / matmul_seconds / 1e12


def _time(step, inputs, repeats: int) -> float:
    return seconds(lambda: jax.block_until_ready(step(*inputs)), repeats)


def layer(config: GptOssConfig, seed: int = 0):
    """One MoE layer's packed weights and biases, random (scales near the released checkpoints')."""
    rng = np.random.default_rng(seed)
    e, d, f = config.num_experts, config.hidden_size, config.intermediate_size

    def packed(rows, columns):
        blocks = rng.integers(0, 256, size=(e, columns, rows // 32, 16), dtype=np.uint8)
        scales = rng.integers(118, 124, size=(e, columns, rows // 32), dtype=np.uint8)
        return Mxfp4Weight(jnp.asarray(blocks), jnp.asarray(scales))

    return (packed(d, 2 * f), jnp.asarray(rng.normal(size=(e, 2 * f)) * 0.1, jnp.bfloat16),
            packed(f, d), jnp.asarray(rng.normal(size=(e, d)) * 0.1, jnp.bfloat16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt_oss_20b", choices=["gpt_oss_20b", "gpt_oss_120b"])
    parser.add_argument("--tokens", default="1,8,64,4096,16384")
    parser.add_argument("--small", action="store_true", help="the tiny preset's sizes (for a CPU smoke run)")
    parser.add_argument("--attention-tokens", default="4096,8192,16384")
    parser.add_argument("--decode-batch", default="1,8,64")
    parser.add_argument("--cache", type=int, default=8192, help="cache slots for decode attention")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    config = GptOssConfig.tiny() if args.small else getattr(GptOssConfig, args.preset)()
    on_gpu = jax.default_backend() == "gpu"
    copy_rate, matmul_rate = ceilings(256 * 2**20 if args.small else 2 * 2**30, 1024 if args.small else 8192)
    print(f"{jax.devices()[0].device_kind} ({platform.machine()}); jax {jax.__version__}; "
          f"{'gpt-oss tiny' if args.small else args.preset} layer: {config.num_experts} experts, hidden "
          f"{config.hidden_size}, intermediate {config.intermediate_size}, top-{config.experts_per_token}, bf16 rows")
    print(f"ceilings: copy {copy_rate:.0f} GB/s, bf16 matmul {matmul_rate:.1f} TFLOP/s"
          + ("" if on_gpu else "  (kernel in interpret mode: not a GPU)"))
    w_gate_up, b_gate_up, w_down, b_down = layer(config)
    swiglu = dict(alpha=config.swiglu_alpha, limit=config.swiglu_limit)
    per_expert_bytes = (w_gate_up.nbytes + w_down.nbytes) // config.num_experts
    d, f, k = config.hidden_size, config.intermediate_size, config.experts_per_token
    print(f"{'tokens':>7} {'XLA ms':>9} {'Pallas ms':>10} {'speed-up':>9} {'GB/s':>8} {'% copy':>7} {'TFLOP/s':>8} "
          f"{'% matmul':>9}")
    for count in (int(t) for t in args.tokens.split(",")):
        rng = np.random.default_rng(count)
        tokens = jnp.asarray(rng.normal(size=(count, d)), jnp.bfloat16)
        experts = jnp.asarray(np.stack([rng.choice(config.num_experts, k, replace=False) for _ in range(count)]),
                              jnp.int32)
        weights = jnp.full((count, k), 1 / k, jnp.float32)
        times = {}
        for kernels in ("xla", "pallas"):
            step = jax.jit(lambda t, w, x, kernels=kernels: run_experts(
                t, w, x, w_gate_up, b_gate_up, w_down, b_down, {}, swiglu, kernels))
            times[kernels] = _time(step, (tokens, weights, experts), args.repeats)
        touched = len(np.unique(np.asarray(experts)))
        rate = touched * per_expert_bytes / times["pallas"] / 1e9
        flops = 2 * count * k * (d * 2 * f + f * d) / times["pallas"] / 1e12
        print(f"{count:>7} {times['xla'] * 1e3:>9.2f} {times['pallas'] * 1e3:>10.2f} "
              f"{times['xla'] / times['pallas']:>8.2f}x {rate:>8.1f} {rate / copy_rate:>7.1%} {flops:>8.2f} "
              f"{flops / matmul_rate:>9.1%}")
    attention_rows(config, [int(t) for t in args.attention_tokens.split(",")],
                   [int(b) for b in args.decode_batch.split(",")], args.cache, args.repeats, matmul_rate, copy_rate)


def attention_rows(config: GptOssConfig, lengths, batches, cache: int, repeats: int, matmul_rate: float,
                   copy_rate: float) -> None:
    """Flash attention forward + backward on a full (causal) layer, and decode attention over a cache."""
    from gptoss_jax.kernels.attention import decode_attention, flash_attention
    from gptoss_jax.ops import attention_with_sinks, blockwise_attention

    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    interpret = jax.default_backend() != "gpu"
    rng = np.random.default_rng(0)
    sinks = jnp.asarray(rng.normal(size=(heads,)), jnp.float32)
    print(f"\nattention, full causal layer, forward + backward ({heads} heads, {kv_heads} kv heads, head_dim "
          f"{head_dim}, bf16)")
    print(f"{'tokens':>7} {'XLA ms':>9} {'Pallas ms':>10} {'speed-up':>9} {'TFLOP/s':>8} {'% matmul':>9}")
    for length in lengths:
        q = jnp.asarray(rng.normal(size=(1, length, heads, head_dim)), jnp.bfloat16)
        k, v = (jnp.asarray(rng.normal(size=(1, length, kv_heads, head_dim)), jnp.bfloat16) for _ in range(2))
        segments = jnp.zeros((1, length), jnp.int32)
        paths = {"xla": lambda q, k, v, s, ids: blockwise_attention(q, k, v, s, ids),
                 "pallas": lambda q, k, v, s, ids: flash_attention(q, k, v, s, ids, interpret=interpret)}
        times = {}
        for name, path in paths.items():
            step = jax.jit(jax.value_and_grad(lambda q, k, v, s, ids, path=path: jnp.sum(path(q, k, v, s, ids).astype(
                jnp.float32)), argnums=(0, 1, 2, 3)))
            try:
                times[name] = _time(step, (q, k, v, sinks, segments), repeats)
            except Exception as error:  # noqa: BLE001 - report a path that cannot run, measure the other
                times[name] = float("nan")
                print(f"        {name}: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
        # causal: half the score matrix; forward 2 matmuls, backward 5
        flops = 7 * 2 * heads * length * length * head_dim / 2 / times["pallas"] / 1e12
        print(f"{length:>7} {times['xla'] * 1e3:>9.2f} {times['pallas'] * 1e3:>10.2f} "
              f"{times['xla'] / times['pallas']:>8.2f}x {flops:>8.2f} {flops / matmul_rate:>9.1%}")
    print(f"\ndecode attention over a {cache}-slot cache (bf16)")
    print(f"{'batch':>7} {'XLA ms':>9} {'Pallas ms':>10} {'speed-up':>9} {'GB/s':>8} {'% copy':>7}")
    for batch in batches:
        q = jnp.asarray(rng.normal(size=(batch, 1, heads, head_dim)), jnp.bfloat16)
        k, v = (jnp.asarray(rng.normal(size=(batch, cache, kv_heads, head_dim)), jnp.bfloat16) for _ in range(2))
        visible = jnp.ones((batch, cache), bool)
        inputs = (q, k, v, sinks, visible)
        times = {"xla": _time(jax.jit(lambda q, k, v, s, seen: attention_with_sinks(q, k, v, s, seen[:, None])),
                              inputs, repeats),
                 "pallas": _time(jax.jit(lambda q, k, v, s, seen: decode_attention(q, k, v, s, seen,
                                                                                   interpret=interpret)),
                                 inputs, repeats)}
        rate = (k.nbytes + v.nbytes) / times["pallas"] / 1e9
        print(f"{batch:>7} {times['xla'] * 1e3:>9.2f} {times['pallas'] * 1e3:>10.2f} "
              f"{times['xla'] / times['pallas']:>8.2f}x {rate:>8.1f} {rate / copy_rate:>7.1%}")


if __name__ == "__main__":
    main()
