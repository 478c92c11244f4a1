"""What an MXFP4 export keeps of fine-tuning, with and without quantization-aware training, on the tiny demo: the
same model trained twice (same data, seed and steps), each exported with its experts in MXFP4, and swept at every
reasoning effort beside the model as trained in float. About 15 minutes on a 2-core CPU.

    python benchmarks/qat_demo.py                   # report: runs/qat_demo/report.md

Rows: configs/train/tiny_demo.py's model as trained (float), then its export with export.mxfp4 = true
(post-training quantization, what other fine-tuning tools ship); configs/train/tiny_demo_qat.py's model as trained
(train.qat = true: its experts' forward is already the export's), then its MXFP4 export. Held-out loss from the
runs themselves (the trainer measures every MXFP4 export it writes against the model as trained); accuracy from
the eval sweep (configs/eval/tiny_demo.py: 200 held-out counting questions, greedy).

Then LoRA, where rounding bites: rank-8 adapters on the experts only, on the MXFP4 export of the plain run (packed),
trained for 100 steps on other questions (data.synthetic.seed 5), with and without QAT, each merged and exported
to MXFP4: an adapter's update can be smaller than the MXFP4 step of the weight it adapts.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from gptoss_jax.eval import sweep  # noqa: E402
from gptoss_jax.eval.backends import JaxBackend  # noqa: E402
from gptoss_jax.generation import Generator  # noqa: E402
from gptoss_jax.settings import read_config  # noqa: E402
from gptoss_jax.train.config import load_config  # noqa: E402
from gptoss_jax.train.trainer import train  # noqa: E402

OUTPUT = ROOT / "runs" / "qat_demo"


def trained(name: str, config_file: str, overrides: list[str]):
    output = OUTPUT / name
    config = load_config(ROOT / "configs" / "train" / config_file,
                         [*overrides, f"--config.train.output_dir={output}"])
    result = train(config, progress=False)
    print(f"{name}: {result.summary()}", flush=True)
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    losses = next(line for line in reversed(metrics) if "eval_loss_exported" in line)
    return result, output / "merged", losses


def accuracies(name: str, checkpoint: Path, model=None) -> dict[str, float]:
    settings = read_config(ROOT / "configs" / "eval" / "tiny_demo.py", [], reference=sweep.defaults())
    settings.model.checkpoint, settings.output_dir = str(checkpoint), str(OUTPUT / name / "eval")
    backend = None if model is None else JaxBackend(Generator(model), max_tokens=settings.max_tokens,
                                                    temperature=settings.temperature, top_p=settings.top_p)
    results = sweep.run(settings, progress=False, backend=backend).summary["results"]
    return {row["effort"]: row["accuracy"] for row in results}


def main():
    plain, plain_export, plain_losses = trained("plain", "tiny_demo.py", ["--config.export.mxfp4=true"])
    qat, qat_export, qat_losses = trained("qat", "tiny_demo_qat.py", [])
    rows = [("trained (float)", plain_losses["eval_loss_trained"], accuracies("float", plain_export, plain.model)),
            ("its MXFP4 export (no QAT)", plain_losses["eval_loss_exported"], accuracies("plain", plain_export)),
            ("trained with QAT", qat_losses["eval_loss_trained"], accuracies("qat_trained", qat_export, qat.model)),
            ("its MXFP4 export", qat_losses["eval_loss_exported"], accuracies("qat", qat_export))]
    efforts = list(rows[0][2])
    lines = ["| model | held-out loss | " + " | ".join(f"accuracy, {e}" for e in efforts) + " |",
             "|---|---:|" + "---:|" * len(efforts)]
    lines += [f"| {name} | {loss:.4f} | " + " | ".join(f"{accuracy[e]:.3f}" for e in efforts) + " |"
              for name, loss, accuracy in rows]
    lines += ["", "| LoRA r8 on the experts of the MXFP4 base | held-out loss as trained | MXFP4 export | change |",
              "|---|---:|---:|---:|"]
    for qat in (False, True):
        _, _, losses = trained(f"lora_{'qat' if qat else 'plain'}", "tiny_demo.py", [
            f"--config.model.checkpoint={plain_export}", "--config.lora.enabled=true", "--config.model.mxfp4=packed",
            "--config.lora.targets=gate_up_proj,down_proj", "--config.export.adapter=false",
            "--config.export.mxfp4=true", f"--config.train.qat={qat}", "--config.train.steps=100",
            "--config.optimizer.learning_rate=1e-3", "--config.data.synthetic.seed=5"])
        before, after = losses["eval_loss_trained"], losses["eval_loss_exported"]
        lines.append(f"| {'with' if qat else 'without'} QAT | {before:.4f} | {after:.4f} | "
                     f"{100 * (after - before) / before:+.2f}% |")
    report = "\n".join(lines) + "\n"
    (OUTPUT / "report.md").write_text(report)
    print(report)


if __name__ == "__main__":
    sys.exit(main())
