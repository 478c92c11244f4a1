"""README command 1 with several training seeds: each seed's eval table, then whether every seed meets the demo's
goals (high >= 60%, high >= low + 30 points, low < medium < high by >= 10 points each; the untrained model at
most 15%).

    python benchmarks/demo_seeds.py --config.train.seed=0,1,2 [--output runs/demo_seeds] [more --config.* overrides]

Each seed trains with `gptoss-jax train --config configs/train/tiny_demo.py` and is evaluated with
`gptoss-jax eval --config configs/eval/tiny_demo.py`, exactly as the README runs them, in its own directory
(about 4 minutes a seed on 2 CPU cores). The untrained model (the preset's initial weights of seed 0) is
evaluated once. Exit status 1 when a seed misses a goal.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN, EVAL = ROOT / "configs" / "train" / "tiny_demo.py", ROOT / "configs" / "eval" / "tiny_demo.py"


def cli(*arguments: str) -> None:
    subprocess.run([sys.executable, "-m", "gptoss_jax.cli", *arguments], check=True, cwd=ROOT)


def evaluate(checkpoint: Path, output: Path) -> dict[str, float]:
    """{effort: accuracy} of the demo's eval sweep on the checkpoint (the command prints its report)."""
    cli("eval", "--config", str(EVAL), f"--config.model.checkpoint={checkpoint}", f"--config.output_dir={output}")
    summary = json.loads((output / "summary.json").read_text())
    return {row["effort"]: row["accuracy"] for row in summary["results"]}


def misses(accuracy: dict[str, float]) -> list[str]:
    """The goals an accuracy table misses."""
    low, medium, high = accuracy["low"], accuracy["medium"], accuracy["high"]
    goals = {"high >= 0.60": high >= 0.6, "high >= low + 0.30": high >= low + 0.3,
             "medium >= low + 0.10": medium >= low + 0.1, "high >= medium + 0.10": high >= medium + 0.1}
    return [goal for goal, met in goals.items() if not met]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config.train.seed", dest="seeds", default="0,1,2", help="training seeds, e.g. 0,1,2")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "demo_seeds")
    args, overrides = parser.parse_known_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    failed = False
    table = []
    for seed in seeds:
        run = args.output / f"seed_{seed}"
        started = time.perf_counter()
        cli("train", "--config", str(TRAIN), f"--config.train.seed={seed}",
                   f"--config.train.output_dir={run}", *overrides)
        trained = time.perf_counter() - started
        print(f"\n## seed {seed} (trained in {trained:.0f} s)\n")
        accuracy = evaluate(run / "merged", run / "eval")
        missed = misses(accuracy)
        failed |= bool(missed)
        table.append((seed, accuracy, missed))

    untrained = args.output / "untrained"
    if not (untrained / "model" / "config.json").exists():
        from flax import nnx

        import gptoss_jax

        model = gptoss_jax.GptOss(gptoss_jax.GptOssConfig.tiny(), dtype="float32", rngs=nnx.Rngs(0))  # as seed 0 starts
        gptoss_jax.save_pretrained(model, untrained / "model", mxfp4=False)
    print("\n## untrained (the preset's initial weights, seed 0)\n")
    baseline = max(evaluate(untrained / "model", untrained / "eval").values())
    failed |= baseline > 0.15

    print("\n| seed | low | medium | high | goals missed |\n|---|---|---|---|---|")
    for seed, accuracy, missed in table:
        print(f"| {seed} | {accuracy['low']:.3f} | {accuracy['medium']:.3f} | {accuracy['high']:.3f} | "
              f"{', '.join(missed) or 'none'} |")
    print(f"| untrained | best effort {baseline:.3f} | | | {'above 0.15' if baseline > 0.15 else 'none'} |")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
