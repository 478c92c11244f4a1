#!/usr/bin/env bash
# The GPU check: run it as it is on a machine with one H100/H200 (at most 8 minutes), or with --small anywhere
# (tiny sizes; on a CPU the kernels run in interpret mode). It checks every Pallas kernel against the XLA path at
# gpt-oss-20b shapes, runs benchmarks/kernel_speed.py, measures 20b prefill and decode (batch 1 and 64) with and
# without the kernels, and a 20b LoRA step at 2048 tokens (time, peak device memory); it prints one table and
# writes it to benchmarks/results/ (or --out DIR). See benchmarks/gpu_check.py for the sections.
# With --aot TARGET (h100, h200, or a target config file) it needs no GPU: it compiles every kernel and the 20b
# inference steps for that GPU (the gpu-compile extra) and prints each kernel's grid, shared memory, registers and
# spills, ending `aot: K of K compiled, S spilled`.
#
#   benchmarks/gpu_check.sh [--small] [--aot TARGET] [--out DIR] [--budget SECONDS]
#
# It needs gptoss-jax importable (an installed checkout, or this checkout with its dependencies: the repository
# root is put on PYTHONPATH here) and, on a GPU, a CUDA build of JAX (pip install -e ".[cuda]").
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export PYTHONUNBUFFERED=1
if ! python3 -c "import gptoss_jax" 2>/dev/null; then
  # A checkout that is not installed: map the top-level kernels/, train/ and eval/ into the package as the
  # editable install does.
  site="$(mktemp -d)"
  mkdir -p "$site/gptoss_jax"
  for part in "$root"/gptoss_jax/*; do ln -s "$part" "$site/gptoss_jax/"; done
  ln -s "$root/kernels" "$site/gptoss_jax/kernels"
  ln -s "$root/train" "$site/gptoss_jax/train"
  ln -s "$root/eval" "$site/gptoss_jax/eval"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec python3 benchmarks/gpu_check.py "$@"
