"""The tiny demo's train step with glibc's default malloc and with `gptoss_jax.allocator.reuse_freed_memory()`
(what the `gptoss-jax` command sets up first), each in a fresh process; prints ms per step, the process's kernel
time per step and the ratio.

    python benchmarks/allocator.py [--steps 30] [more --config.* overrides of configs/train/tiny_demo.py]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(steps: int, overrides: list[str], output: str) -> dict[str, float]:
    """ms of wall and of kernel (system) time per step, after 3 warm-up steps, in this process."""
    import resource
    import time

    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from gptoss_jax.train import data, trainer
    from gptoss_jax.train.config import load_config

    config = load_config(ROOT / "configs" / "train" / "tiny_demo.py",
                         [f"--config.train.output_dir={output}", *overrides])
    mesh = trainer.make_mesh(config)
    graphdef, master, frozen, dtypes = trainer.split_trainable(config, trainer.build_model(config, mesh))
    transform, schedule = trainer.make_optimizer(config, master)
    opt_state = trainer.init_optimizer(transform, master, mesh)
    step_fn = trainer.make_steps(config, graphdef, dtypes, transform, schedule).train
    stats = data.DataStats()
    batches = trainer.Batches(trainer.load_examples(config, config.data.train, split="train", stats=stats), config,
                              stats)
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    for step in range(3 + steps):
        if step == 3:
            started, kernel = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
        batch = trainer._global_batch(batches.batch(step), sharding)
        master, opt_state, metrics = step_fn(master, opt_state, frozen, batch, jnp.int32(step))
        float(metrics["loss"])
    return {"step_ms": (time.perf_counter() - started) / steps * 1e3,
            "kernel_ms": (resource.getrusage(resource.RUSAGE_SELF).ru_stime - kernel) / steps * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--child", choices=("default", "reuse"), help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(ROOT / "runs" / "allocator_benchmark"))
    args, overrides = parser.parse_known_args()
    if args.child:
        if args.child == "reuse":
            from gptoss_jax.allocator import reuse_freed_memory

            assert reuse_freed_memory(), "not glibc: nothing to compare"
        print(json.dumps(measure(args.steps, overrides, args.output)))
        return 0
    results = {}
    for mode in ("default", "reuse"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(args.steps),
                              "--output", args.output, *overrides], check=True, capture_output=True, text=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print("| malloc | ms / step | kernel ms / step |\n|---|---:|---:|")
    for mode, label in (("default", "glibc default"), ("reuse", "reuse_freed_memory()")):
        print(f"| {label} | {results[mode]['step_ms']:.0f} | {results[mode]['kernel_ms']:.0f} |")
    print(f"\nspeed-up: {results['default']['step_ms'] / results['reuse']['step_ms']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
