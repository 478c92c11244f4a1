"""benchmarks/gpu_check.sh, the one script a GPU session runs, kept working on a CPU with --small."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_end_to_end_with_small_sizes(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--small", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (tmp_path / "gpu_check-cpu-small.md").read_text()
    for section in ("kernels", "benchmark", "inference", "lora"):
        assert f"| {section} |" in table, section
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    assert len(rows) >= 10 and all("| ok |" in row for row in rows), table
    assert "tok/s" in table and "LoRA step" in table
