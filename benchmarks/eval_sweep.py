"""An eval sweep of the tiny demo model through the engine: static batching (every sample of a chunk decoding until
the longest ends; `slots = 0`, the default) against continuous batching (`slots` samples decoding, a finished one's
slot taken by the next), same samples, same seeds, the lengths as they come — and, with `--baseline`, against the
code of an earlier revision of this repository, run the same way on the same machine.

The demo model is the README's (`gptoss-jax train --config configs/train/tiny_demo.py` writes runs/tiny_demo/merged;
pass another checkpoint as the first argument). Each mode sweeps all three efforts over the first PROBLEMS problems
of the demo's held-out set twice on one Generator (the first run compiles; the second is timed) and reports
generated tokens per second (and its ratio to the static sweeps') and accuracy per effort; the samples' finals are
compared with the static sweep's. The lengths of the samples, per effort, say how much a static batch can waste.

    python benchmarks/eval_sweep.py [CHECKPOINT] [SLOTS ...] [--baseline REVISION]

--baseline REVISION: the static sweep's generations (its prompts, chunk by chunk, with their seeds and settings) are
replayed through the `Generator` of a git revision of this checkout (e.g. 0faeef0, main when issue 30 was filed:
every chunk one static batch, before the engine) in a child process: the revision is exported with `git archive`
and installed with pip (no dependencies: this environment's) into a temporary directory that the child imports.
Its tokens are compared with the static sweep's; its time leaves out the harness (rendering, grading, the report:
~0.2 s a sweep here), which favours it.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

import gptoss_jax
from gptoss_jax.eval import sweep
from gptoss_jax.eval.backends import JaxBackend
from gptoss_jax.generation import Generator

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


def recorded(generator: Generator, calls: list) -> Generator:
    """`generator`, its `generate` calls and their results appended to `calls`."""
    generate = generator.generate

    def recording(prompts, max_new_tokens, **settings):
        outputs = generate(prompts, max_new_tokens, **settings)
        calls.append({"prompts": [list(map(int, p)) for p in prompts], "max_new_tokens": max_new_tokens,
                      "settings": {k: v for k, v in settings.items() if v is not None and k != "stream"},
                      "outputs": outputs})
        return outputs

    generator.generate = recording
    return generator


def replayed(checkpoint: str, calls: list[dict]) -> tuple[float, list[list[list[int]]]]:
    """(seconds, outputs) of the second of two runs of `calls` through this process's `Generator`."""
    generator = Generator(gptoss_jax.load_model(checkpoint, dtype="float32"))
    for _ in range(2):
        start = time.perf_counter()
        outputs = [generator.generate(call["prompts"], call["max_new_tokens"], **call["settings"]) for call in calls]
        elapsed = time.perf_counter() - start
    return elapsed, outputs


def baseline_replay(revision: str, checkpoint: str, calls: list[dict]) -> tuple[float, list[list[list[int]]]]:
    """`replayed` with the code of `revision`, in a child process."""
    with tempfile.TemporaryDirectory() as directory:
        source, site, exchange = Path(directory, "source"), Path(directory, "site"), Path(directory, "calls.json")
        source.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", str(site), str(source)], check=True, capture_output=True)
        exchange.write_text(json.dumps([{k: v for k, v in call.items() if k != "outputs"} for call in calls]))
        child = subprocess.run([sys.executable, __file__, checkpoint, "--replay", str(exchange)], check=True,
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)})
    result = json.loads(child.stdout.splitlines()[-1])
    return result["seconds"], result["outputs"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default=str(ROOT / "runs/tiny_demo/merged"))
    parser.add_argument("slots", nargs="*", type=int, default=[16, 32])
    parser.add_argument("--baseline", metavar="REVISION", help="replay the static sweep with this revision's code")
    parser.add_argument("--replay", help=argparse.SUPPRESS)  # the baseline's process: the calls to replay
    args = parser.parse_args()
    if not Path(args.checkpoint).exists():
        sys.exit(f"{args.checkpoint}: no checkpoint; run `gptoss-jax train --config configs/train/tiny_demo.py` first")
    if args.replay:
        seconds, outputs = replayed(args.checkpoint, json.loads(Path(args.replay).read_text()))
        print(json.dumps({"seconds": seconds, "outputs": outputs}))
        return
    calls = []
    generator = recorded(Generator(gptoss_jax.load_model(args.checkpoint, dtype="float32")), calls)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"# eval sweep, {PROBLEMS} problems x 3 efforts, greedy, max_tokens 160: {cpu}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}")
    static = f"static, chunks of {sweep.defaults().batch_size}"
    results = {static: timed_sweep(generator, args.checkpoint, 0)}
    static_calls = calls[len(calls) // 2:]  # the timed run's
    results.update({f"continuous, {slots} slots": timed_sweep(generator, args.checkpoint, slots)
                    for slots in args.slots})
    for effort in EFFORTS:
        lengths = [r["completion_tokens"] for r in results[static][1] if r["effort"] == effort]
        print(f"- {effort}: {len(lengths)} samples of {min(lengths)} to {max(lengths)} tokens, "
              f"{sum(lengths) / len(lengths):.1f} on average")
    rate = {name: sum(r["completion_tokens"] for r in records) / seconds
            for name, (seconds, records) in results.items()}
    rows = [(name, seconds, rate[name], " / ".join(f"{accuracy(records, effort):.2f}" for effort in EFFORTS),
             finals(records) == finals(results[static][1])) for name, (seconds, records) in results.items()]
    if args.baseline:
        seconds, outputs = baseline_replay(args.baseline, args.checkpoint, static_calls)
        rate[args.baseline] = sum(len(tokens) for call in outputs for tokens in call) / seconds
        rows.append((f"{args.baseline}: the static sweep's generations replayed", seconds, rate[args.baseline],
                     "(not graded)", outputs == [call["outputs"] for call in static_calls]))
    references = [static] + ([args.baseline] if args.baseline else [])
    print("\n| batching | seconds | tokens/s | " + " | ".join(f"vs {name}" for name in references)
          + f" | accuracy ({' / '.join(EFFORTS)}) | same samples as static (finals; replay: tokens) |")
    print("|---|---|---|" + "---|" * len(references) + "---|---|")
    for name, seconds, tokens_per_second, accuracies, equal in rows:
        ratios = " | ".join(f"{tokens_per_second / rate[reference]:.2f}x" for reference in references)
        print(f"| {name} | {seconds:.1f} | {tokens_per_second:.0f} | {ratios} | {accuracies} | {equal} |")


def accuracy(records: list[dict], effort: str) -> float:
    return sum(r["correct"] for r in records if r["effort"] == effort) / PROBLEMS


def finals(records: list[dict]) -> dict[tuple, str]:
    return {(r["task"], r["effort"], r["problem"], r["sample"]): r["final"] for r in records}


if __name__ == "__main__":
    main()
