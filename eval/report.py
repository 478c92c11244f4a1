"""Metrics per task x effort, and the files a sweep leaves: summary.json, report.md, accuracy_vs_reasoning.png.

accuracy    mean of the samples' grades (a failed or truncated sample counts as wrong), with the standard error of
            the mean over problems (each problem's samples averaged first: they are not independent draws).
pass@k      the unbiased estimator of Chen et al. (2021) for k = 1, 2, 4, ... up to the samples per problem.
tokens      analysis and final tokens per sample (o200k_harmony encodings of the texts), mean and median.
rates       truncated (max_tokens reached), parse failures (the grader read no answer), failed (generation error).
tools       the built-in tools the task's samples could call, and the calls per sample (mean).
time        the summed generation wall time of the cell's chunks, and generated tokens per second over it.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUMMARY_FILE, REPORT_FILE, PLOT_FILE = "summary.json", "report.md", "accuracy_vs_reasoning.png"
TIMING_KEYS = ("wall_seconds", "tokens_per_second")  # what differs between two runs of the same sweep


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n is correct."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def cell_metrics(records: list[dict[str, Any]], samples: int) -> dict[str, Any]:
    """The metrics of one task x effort from its records (every problem's `samples` records, in problem order)."""
    per_problem = [records[i:i + samples] for i in range(0, len(records), samples)]
    problem_means = [sum(r["correct"] for r in group) / samples for group in per_problem]
    analysis = [r["analysis_tokens"] for r in records]
    final = [r["final_tokens"] for r in records]
    wall = sum(r["seconds"] for r in records)
    ks = sorted({2 ** i for i in range(samples.bit_length()) if 2 ** i <= samples} | {samples})
    count = len(records)
    return {
        "tools": ", ".join(records[0].get("tools", [])) or "none",
        "tool_calls_mean": statistics.fmean(len(r.get("tool_calls", [])) for r in records),
        "problems": len(per_problem), "samples": count,
        "accuracy": sum(problem_means) / len(problem_means),
        "stderr": statistics.stdev(problem_means) / math.sqrt(len(problem_means)) if len(problem_means) > 1 else 0.0,
        **{f"pass@{k}": sum(pass_at_k(samples, sum(r["correct"] for r in group), k) for group in per_problem)
           / len(per_problem) for k in ks},
        "analysis_tokens_mean": statistics.fmean(analysis), "analysis_tokens_median": statistics.median(analysis),
        "final_tokens_mean": statistics.fmean(final), "final_tokens_median": statistics.median(final),
        "truncated_rate": sum(r["truncated"] for r in records) / count,
        "parse_failure_rate": sum(r["error"] is None and r["parsed"] is None for r in records) / count,
        "failed_rate": sum(r["error"] is not None for r in records) / count,
        "wall_seconds": wall,
        "tokens_per_second": sum(r["completion_tokens"] for r in records) / wall if wall > 0 else 0.0,
    }


def summarise(cells: list[tuple[str, str, list[dict]]], samples: int, *, settings: dict[str, Any],
              model: str) -> dict[str, Any]:
    """summary.json's content: the settings, then one row of metrics per (task, effort)."""
    rows = [{"task": task, "effort": effort, **cell_metrics(records, samples)} for task, effort, records in cells]
    return {"model": model, "samples_per_problem": samples, "settings": settings, "results": rows}


_FORMATS = {"": "free text (the grader reads the final answer)",
            "json": 'JSON {"answer": ...} held to its schema by constrained decoding'}


def markdown(summary: dict[str, Any]) -> str:
    """The results as a markdown table, one row per task x effort."""
    rows = summary["results"]
    pass_keys = [key for key in rows[0] if key.startswith("pass@") and key != "pass@1"] if rows else []
    header = ["task", "effort", "tools", "accuracy", *pass_keys, "analysis tokens (mean / median)",
              "final tokens (mean / median)", "tool calls (mean)", "truncated", "parse failures", "failed", "samples",
              "time (s)", "tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["task"], row["effort"], row["tools"], f"{row['accuracy']:.3f} ± {row['stderr']:.3f}",
                 *(f"{row[key]:.3f}" for key in pass_keys),
                 f"{row['analysis_tokens_mean']:.1f} / {row['analysis_tokens_median']:g}",
                 f"{row['final_tokens_mean']:.1f} / {row['final_tokens_median']:g}", f"{row['tool_calls_mean']:.1f}",
                 f"{row['truncated_rate']:.1%}", f"{row['parse_failure_rate']:.1%}", f"{row['failed_rate']:.1%}",
                 str(row["samples"]), f"{row['wall_seconds']:.1f}", f"{row['tokens_per_second']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    settings = summary["settings"]
    return (f"# Eval of {summary['model']}\n\n{summary['samples_per_problem']} sample(s) per problem, max_tokens "
            f"{settings['max_tokens']}, temperature {settings['temperature']}, top_p {settings['top_p']}, "
            f"response format: {_FORMATS[settings.get('response_format') or '']}. "
            f"Accuracy ± standard error over problems.\n\n" + "\n".join(lines) + "\n\n"
            f"Every sample (prompt, harmony output, parsed answer, grade): `samples.jsonl`. "
            f"Accuracy against reasoning length: `{PLOT_FILE}`.\n")


def plot(summary: dict[str, Any], path: Path) -> None:
    """Accuracy against mean analysis tokens: one point per effort, one line per task."""
    try:
        import matplotlib
    except ImportError:
        log.warning("no plot: drawing %s needs matplotlib (pip install 'gptoss-jax[eval]')", path.name)
        return
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6.4, 4.4), dpi=120)
    for task in dict.fromkeys(row["task"] for row in summary["results"]):
        rows = [row for row in summary["results"] if row["task"] == task]
        x = [row["analysis_tokens_mean"] for row in rows]
        y = [row["accuracy"] for row in rows]
        axes.errorbar(x, y, yerr=[row["stderr"] for row in rows], marker="o", capsize=3, label=task)
        efforts_at = {}  # efforts that land on the same point share one label instead of printing over each other
        for row, xi, yi in zip(rows, x, y, strict=True):
            efforts_at.setdefault((xi, yi), []).append(row["effort"])
        for point, efforts in efforts_at.items():
            axes.annotate(", ".join(efforts), point, textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("mean analysis tokens per sample")
    axes.set_ylabel("accuracy")
    axes.set_ylim(0, 1.05)  # the whole scale: an axis fitted to the points makes a small difference look large
    axes.set_title(f"Accuracy against reasoning effort: {summary['model']}", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def write(summary: dict[str, Any], output: Path) -> None:
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    (output / REPORT_FILE).write_text(markdown(summary))
    plot(summary, output / PLOT_FILE)
