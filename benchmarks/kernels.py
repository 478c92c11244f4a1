"""The Pallas MXFP4 expert kernel against the XLA path (dequantize, then ragged_dot / gathered experts), at one
gpt-oss MoE layer's shapes, with the device's copy bandwidth and bf16 matmul rate measured in the same run as the
ceilings. Each row times the whole expert computation of one layer (gate-up with SwiGLU, down, bias, weighting)
for `tokens` tokens routed to 4 experts each.

    python benchmarks/kernels.py                         # gpt-oss-20b layer: decode 1-64 tokens, prefill 4k-16k
    python benchmarks/kernels.py --preset gpt_oss_120b
    python benchmarks/kernels.py --small --tokens 1,64   # tiny shapes, interpret mode: a smoke run on a CPU

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
from gptoss_jax.model import _grouped_experts
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
            step = jax.jit(lambda t, w, x, kernels=kernels: _grouped_experts(
                t, w, x, w_gate_up, b_gate_up, w_down, b_down, {}, swiglu, kernels))
            times[kernels] = seconds(lambda step=step: step(tokens, weights, experts).block_until_ready(),
                                     args.repeats)
        touched = len(np.unique(np.asarray(experts)))
        rate = touched * per_expert_bytes / times["pallas"] / 1e9
        flops = 2 * count * k * (d * 2 * f + f * d) / times["pallas"] / 1e12
        print(f"{count:>7} {times['xla'] * 1e3:>9.2f} {times['pallas'] * 1e3:>10.2f} "
              f"{times['xla'] / times['pallas']:>8.2f}x {rate:>8.1f} {rate / copy_rate:>7.1%} {flops:>8.2f} "
              f"{flops / matmul_rate:>9.1%}")


if __name__ == "__main__":
    main()
