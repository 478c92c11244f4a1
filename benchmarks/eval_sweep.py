"""An eval sweep of the tiny demo model through the engine: static batching (every sample of a chunk decoding until
the longest ends; `slots = 0`, the default) against continuous batching (`slots` samples decoding, a finished one's
slot taken by the next), same samples, same seeds, the lengths as they come.

The demo model is the README's (`gptoss-jax train --config configs/train/tiny_demo.py` writes runs/tiny_demo/merged;
pass another checkpoint as the first argument). Each mode sweeps all three efforts over the first PROBLEMS problems
of the demo's held-out set twice on one Generator (the first run compiles; the second is timed) and reports
generated tokens per second; the samples' finals must be the same to the sample in every mode. The lengths of the
samples, per effort, say how much a static batch can waste.

    python benchmarks/eval_sweep.py [CHECKPOINT] [SLOTS ...]
"""

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax

from gptoss_jax.eval import sweep
from gptoss_jax.eval.backends import JaxBackend
from gptoss_jax.generation import Generator
from gptoss_jax.inference import load_for_inference

PROBLEMS = 60
EFFORTS = ("low", "medium", "high")
ROOT = Path(__file__).resolve().parents[1]


def timed_sweep(generator: Generator, checkpoint: str, slots: int) -> tuple[float, list[dict]]:
    """(seconds, the samples) of the sweep's second run."""
    backend = JaxBackend(generator, max_tokens=160, temperature=0.0, top_p=1.0, slots=slots or None)
    for _ in range(2):
        with tempfile.TemporaryDirectory() as output:
            config = sweep.defaults()
            config.model.checkpoint, config.output_dir, config.limit = checkpoint, output, PROBLEMS
            config.efforts, config.slots = EFFORTS, slots
            start = time.perf_counter()
            sweep.run(config, backend=backend, progress=False)
            elapsed = time.perf_counter() - start
            records = list(sweep._read_samples(Path(output) / sweep.SAMPLES_FILE).values())
    return elapsed, records


def main(checkpoint: str = str(ROOT / "runs/tiny_demo/merged"), *slot_counts: str):
    if not Path(checkpoint).exists():
        sys.exit(f"{checkpoint}: no checkpoint; run `gptoss-jax train --config configs/train/tiny_demo.py` first")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"# eval sweep, {PROBLEMS} problems x 3 efforts, greedy, max_tokens 160: {cpu}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}")
    generator = Generator(load_for_inference(checkpoint, dtype="float32"))
    modes = [0] + [int(count) for count in slot_counts or ("16", "32")]
    results = {slots: timed_sweep(generator, checkpoint, slots) for slots in modes}
    base_seconds, base_records = results[0]
    for effort in EFFORTS:
        lengths = [r["completion_tokens"] for r in base_records if r["effort"] == effort]
        print(f"- {effort}: {len(lengths)} samples of {min(lengths)} to {max(lengths)} tokens, "
              f"{sum(lengths) / len(lengths):.1f} on average")
    print("\n| batching | seconds | tokens | tokens/s | vs static | finals equal |")
    print("|---|---|---|---|---|---|")
    for slots, (elapsed, records) in results.items():
        tokens = sum(r["completion_tokens"] for r in records)
        name = f"static, chunks of {sweep.defaults().batch_size}" if not slots else f"continuous, {slots} slots"
        print(f"| {name} | {elapsed:.1f} | {tokens} | {tokens / elapsed:.0f} | {base_seconds / elapsed:.2f}x | "
              f"{[r['final'] for r in records] == [r['final'] for r in base_records]} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
