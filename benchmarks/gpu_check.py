"""The one GPU check (run through benchmarks/gpu_check.sh): everything a first GPU should tell us, in one table.

  kernels    every Pallas kernel compiled at gpt-oss-20b shapes and checked against the XLA path it replaces
             (MXFP4 grouped matmul with SwiGLU, forward and backward; flash attention with sinks, banded and full,
             forward and backward; decode attention)
  benchmark  benchmarks/kernel_speed.py (kernels against the XLA paths, with the device's ceilings)
  inference  gpt-oss-20b with random full-size weights made on the device: prefill and decode (batch 1 and 64)
             tokens/s, with the kernels (`auto`) and without (`xla`)
  lora       one LoRA step (attention + experts, configs/train/gpt_oss_20b_lora.py) at 2048 tokens: time and the
             device's peak memory, with and without the kernels

`--small` runs the same on the tiny preset with tiny sizes (on a CPU the kernels run in interpret mode): the
test suite runs it so the script keeps working between GPU sessions. A section that fails or does not fit the
time budget is reported as such; the others still run.

`--aot TARGET` (h100, h200 or a target config file) needs no GPU: it compiles every kernel at gpt-oss-20b and 120b
shapes, and the 20b prefill, decode step and LoRA train step with kernels "auto" and "xla", for that GPU
(`gptoss_jax.gpu_compile`: the gpu-compile extra) and prints one table — kernel, program, grid, shared memory,
registers, spills, compile time — ending `aot: K of K compiled, S spilled`.

On a GPU the script also writes the device's own target config (target_config.txtpb) beside the table: the figures
`gptoss_jax/targets/` should hold for it.

    python benchmarks/gpu_check.py [--small] [--aot TARGET] [--out DIR] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gptoss_jax import ops  # noqa: E402
from gptoss_jax.config import GptOssConfig  # noqa: E402
from gptoss_jax.generation import Generator  # noqa: E402
from gptoss_jax.kernels.attention import decode_attention, flash_attention  # noqa: E402
from gptoss_jax.kernels.mxfp4_matmul import mxfp4_ragged_matmul, reference  # noqa: E402
from gptoss_jax.model import GptOss, LoRAParam  # noqa: E402
from gptoss_jax.mxfp4 import Mxfp4Weight  # noqa: E402

GIB = 2**30
BF16_BOUND = 1e-2  # relative error of a bf16 kernel against the XLA path, as the CPU tests bound it


@dataclasses.dataclass
class Sizes:
    """What each section runs: gpt-oss-20b and its working sizes, or the tiny preset for --small."""

    config: GptOssConfig
    tokens: int  # rows of the grouped matmul check (tokens, each routed to 4 experts)
    attention: int  # sequence length of the attention checks
    cache: int  # decode attention's cache slots
    prefill: int  # prompt tokens of the prefill measurement
    decode_batches: tuple[int, ...]
    decode_steps: int
    lora_tokens: int
    kernel_mode: str  # the kernels setting measured against "xla"
    benchmark_args: tuple[str, ...]


def sizes(small: bool) -> Sizes:
    if small:
        return Sizes(GptOssConfig.tiny().replace(vocab_size=512), 16, 48, 64, 48, (1, 4), 4, 64, "pallas",
                     ("--small", "--tokens", "1,16", "--attention-tokens", "64", "--decode-batch", "1",
                      "--cache", "64", "--repeats", "1"))
    return Sizes(GptOssConfig.gpt_oss_20b(), 4096, 4096, 8192, 4096, (1, 64), 32, 2048, "auto",
                 ("--tokens", "1,64,4096", "--attention-tokens", "4096,8192", "--decode-batch", "1,64",
                  "--repeats", "5"))


# ---- random full-size weights, made on the device ---------------------------------------------------------------


def random_model(config: GptOssConfig, kernels: tuple[str, ...], seed: int = 0) -> list[GptOss]:
    """The model with MXFP4 experts and random weights of a trained model's magnitudes, built leaf by leaf on the
    device (no host copy, nothing dequantized), once per `kernels` setting, all sharing the same arrays."""
    graphdefs = []
    for setting in kernels:
        abstract = nnx.eval_shape(lambda setting=setting: GptOss(
            config.replace(kernels=setting), dtype="bfloat16", mxfp4_experts=True, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        graphdefs.append(graphdef)
    flat = nnx.to_flat_state(state)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    values = [(path, variable.replace(value=jax.tree.map(
        lambda leaf, key=key, name=path[-1]: _random_leaf(key, leaf.shape, leaf.dtype, name), variable.get_value())))
        for (path, variable), key in zip(flat, keys, strict=True)]
    state = jax.block_until_ready(nnx.from_flat_state(values))  # made before anything is timed
    return [nnx.merge(graphdef, state) for graphdef in graphdefs]


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random_leaf(key, shape, dtype, name):
    if dtype == jnp.uint8:  # MXFP4 blocks (16 bytes a row) or scales (2**-8 .. 2**-6)
        if shape[-1] == 16:
            return jax.random.bits(key, shape, jnp.uint8)
        return jax.random.randint(key, shape, 119, 122).astype(jnp.uint8)
    if name == "scale":  # RMSNorm
        return (1 + 0.1 * jax.random.normal(key, shape)).astype(dtype)
    return (0.02 * jax.random.normal(key, shape)).astype(dtype)


# ---- sections --------------------------------------------------------------------------------------------------


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def check_kernels(s: Sizes, rows: list) -> None:
    """Each kernel against the XLA path, outputs and gradients, relative error <= BF16_BOUND."""
    interpret = jax.default_backend() != "gpu"
    c = s.config
    rng = np.random.default_rng(0)
    e, d, f = c.num_experts, c.hidden_size, c.intermediate_size
    weight = Mxfp4Weight(jnp.asarray(rng.integers(0, 256, (e, 2 * f, d // 32, 16)), jnp.uint8),
                         jnp.asarray(rng.integers(119, 122, (e, 2 * f, d // 32)), jnp.uint8))
    pairs = s.tokens * c.experts_per_token
    group_sizes = jnp.asarray(np.bincount(rng.integers(0, e, pairs), minlength=e), jnp.int32)
    x = jnp.asarray(rng.normal(size=(pairs, d)), jnp.bfloat16)
    bias = jnp.asarray(rng.normal(size=(e, 2 * f)) * 0.1, jnp.bfloat16)
    swiglu = (c.swiglu_alpha, c.swiglu_limit)

    def matmul_loss(function):
        return jax.jit(jax.value_and_grad(lambda x: jnp.sum(function(x) ** 2)))

    started = time.perf_counter()
    (kernel_loss, kernel_grad) = matmul_loss(lambda x: mxfp4_ragged_matmul(
        x, weight, group_sizes, bias, swiglu=swiglu, interpret=interpret))(x)
    (xla_loss, xla_grad) = matmul_loss(lambda x: reference(x, weight, group_sizes, bias, swiglu=swiglu))(x)
    error = max(abs(float(kernel_loss) / float(xla_loss) - 1), relative_error(kernel_grad, xla_grad))
    rows.append(("kernels", f"MXFP4 grouped matmul + SwiGLU, {pairs} rows, fwd+bwd", _verdict(error),
                 f"rel. error {error:.1e}", time.perf_counter() - started))

    heads, kv_heads, head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = jnp.asarray(rng.normal(size=(1, s.attention, heads, head_dim)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(1, s.attention, kv_heads, head_dim)), jnp.bfloat16) for _ in range(2))
    sinks = jnp.asarray(rng.normal(size=(heads,)), jnp.float32)
    segments = jnp.zeros((1, s.attention), jnp.int32)
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    for window in (c.sliding_window, None):
        started = time.perf_counter()

        def attention_grads(function, q=q, k=k, v=v):
            return jax.jit(jax.grad(lambda *args: jnp.sum(function(*args) * cotangent), argnums=(0, 1, 2, 3)))(
                q, k, v, sinks)

        kernel = attention_grads(lambda *a, w=window: flash_attention(*a, segments, window=w, interpret=interpret))
        xla = attention_grads(lambda *a, w=window: ops.blockwise_attention(*a, segments, window=w))
        out_error = relative_error(flash_attention(q, k, v, sinks, segments, window=window, interpret=interpret),
                                   ops.blockwise_attention(q, k, v, sinks, segments, window=window))
        error = max([out_error] + [relative_error(a, b) for a, b in zip(kernel, xla, strict=True)])
        rows.append(("kernels", f"flash attention, {s.attention} tokens, window {window}, fwd+bwd",
                     _verdict(error), f"rel. error {error:.1e}", time.perf_counter() - started))

    started = time.perf_counter()
    q = jnp.asarray(rng.normal(size=(8, 1, heads, head_dim)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(8, s.cache, kv_heads, head_dim)), jnp.bfloat16) for _ in range(2))
    visible = jnp.asarray(rng.random((8, s.cache)) < 0.9)
    error = relative_error(jax.jit(lambda *a: decode_attention(*a, interpret=interpret))(q, k, v, sinks, visible),
                           ops.attention_with_sinks(q, k, v, sinks, visible[:, None]))
    rows.append(("kernels", f"decode attention, batch 8, {s.cache} slots", _verdict(error),
                 f"rel. error {error:.1e}", time.perf_counter() - started))


def _verdict(error: float) -> str:
    return "ok" if error <= BF16_BOUND else "FAILED"


def run_benchmark(s: Sizes, rows: list, out: Path) -> None:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_speed.py"), *s.benchmark_args],
                            capture_output=True, text=True, timeout=600)
    (out / "kernels.txt").write_text(result.stdout + result.stderr)
    rows.append(("benchmark", "benchmarks/kernel_speed.py " + " ".join(s.benchmark_args),
                 "ok" if result.returncode == 0 else "FAILED", f"output in {out / 'kernels.txt'}",
                 time.perf_counter() - started))


def measure_inference(s: Sizes, rows: list) -> None:
    """Prefill and decode tokens/s of the random model, per kernels setting."""
    for model in random_model(s.config, ("xla", s.kernel_mode)):
        setting = model.config.kernels
        generator = Generator(model)
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, s.config.vocab_size, s.prefill).tolist()
        started = time.perf_counter()
        generator.generate([prompt], 1)  # compiles
        compile_seconds = time.perf_counter() - started
        started = time.perf_counter()
        generator.generate([prompt], 1)
        prefill = time.perf_counter() - started
        rows.append(("inference", f"prefill, {s.prefill} tokens, kernels={setting}", "ok",
                     f"{s.prefill / prefill:,.0f} tok/s (first call {compile_seconds:.0f} s)", prefill))
        for batch in s.decode_batches:
            prompts = [rng.integers(0, s.config.vocab_size, 128).tolist() for _ in range(batch)]
            capacity = 128 + s.decode_steps + 1  # one cache size for both calls: the second runs compiled steps
            generator.generate(prompts, 2, stop_tokens=[], cache_length=capacity)  # compiles
            stamps: list[float] = []
            generator.generate(prompts, s.decode_steps + 1, stop_tokens=[], cache_length=capacity,
                               stream=lambda row, token, stamps=stamps: row == 0 and stamps.append(time.perf_counter()))
            step = (stamps[-1] - stamps[0]) / s.decode_steps
            rows.append(("inference", f"decode, batch {batch}, kernels={setting}", "ok",
                         f"{batch / step:,.1f} tok/s ({step * 1e3:.1f} ms a step)", step * s.decode_steps))
        del generator, model


def measure_lora(s: Sizes, rows: list, setting: str, small: bool) -> None:
    """One LoRA step, in a process of its own: the device's peak memory is then the step's alone."""
    command = [sys.executable, __file__, "--lora-step", setting] + (["--small"] if small else [])
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"the LoRA step failed: {result.stderr.strip().splitlines()[-1:]}")
    rows.append(tuple(json.loads(result.stdout.strip().splitlines()[-1])))


def lora_step(s: Sizes, setting: str) -> tuple:
    """One LoRA step of configs/train/gpt_oss_20b_lora.py at `lora_tokens` tokens: time and peak memory."""
    from gptoss_jax import lora
    from gptoss_jax.train import run, trainer
    from gptoss_jax.train.config import load_config

    config = load_config(ROOT / "configs" / "train" / "gpt_oss_20b_lora.py", [
        "--config.model.checkpoint=", f"--config.data.seq_len={s.lora_tokens}", "--config.data.batch_size=1",
        "--config.optimizer.grad_accum=1"])
    model, = random_model(s.config, (setting,), seed=1)
    lora.add_lora(model, run.lora_config(config), rngs=nnx.Rngs(2))
    graphdef, params, frozen = nnx.split(model, LoRAParam, ...)
    dtypes = jax.tree.map(lambda a: a.dtype, params)
    master = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    transform, schedule = trainer.make_optimizer(config, master)
    state = {"master": master, "opt": transform.init(master)}
    step = trainer.make_steps(config, graphdef, dtypes, transform, schedule).train
    length = s.lora_tokens
    tokens = np.random.default_rng(0).integers(0, s.config.vocab_size, (1, length + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((1, length), np.float32),
             "segment_ids": np.ones((1, length), np.int32), "positions": np.arange(length, dtype=np.int32)[None]}
    times = []
    for index in range(2):
        started = time.perf_counter()
        state["master"], state["opt"], metrics = step(state["master"], state["opt"], frozen, batch, jnp.int32(index))
        loss = float(metrics["loss"])
        times.append(time.perf_counter() - started)
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    memory = f", peak {peak / GIB:.2f} GiB" if peak else ""
    return ("lora", f"LoRA step, {length} tokens, kernels={setting}", "ok" if np.isfinite(loss) else "FAILED",
            f"{times[1] * 1e3:,.0f} ms{memory} (first call {times[0]:.0f} s)", sum(times))


# ---- compiled for a GPU that is not here (--aot) --------------------------------------------------------------------


def compile_ahead(target: str, out: Path) -> int:
    """Every kernel, the 20b inference steps and the 20b LoRA step compiled for `target`; one table, ending `aot: K of
    K compiled, S spilled`. Returns 0 when all compiled without spills."""
    from gptoss_jax import gpu_compile
    from gptoss_jax.train.config import load_config
    from gptoss_jax.train.plan import plan

    gpu = gpu_compile.target(target)
    devices, present = gpu_compile.devices(gpu, 1)
    checks = [(name, check) for name, config in (("20b", GptOssConfig.gpt_oss_20b()),
                                                 ("120b", GptOssConfig.gpt_oss_120b()))
              for check in gpu_compile.kernel_checks(config)]
    checks += [("20b", check) for kernels in ("auto", "xla")
               for check in gpu_compile.inference_checks(GptOssConfig.gpt_oss_20b().replace(kernels=kernels))]
    lines = [f"gptoss-jax GPU check --aot {target}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC: compiled "
             f"for {gpu.description} (sm {gpu.compute_capability}, {'present' if present else 'deviceless'}) on "
             f"{platform.machine()}, jax {jax.__version__}", "",
             "| kernel | program | grid | shared memory | registers | spills | compile s |",
             "|---|---|---|---:|---:|---:|---:|"]

    def lora_step(kernels):  # the trainer's LoRA step, as `plan --target` compiles it; its memory in the table
        def compile_step(dump):
            report = plan(load_config(ROOT / "configs" / "train" / "gpt_oss_20b_lora.py", [
                "--config.model.checkpoint=", "--config.model.preset=gpt_oss_20b", "--config.optimizer.grad_accum=1",
                f"--config.model.kernels={kernels}"]), target=target, dump_to=str(dump))
            return f": {report.total_bytes / GIB:.1f} GiB"

        return compile_step

    def check_step(check):
        def compile_step(dump):
            gpu_compile.compile_check(check, devices, dump_to=dump)
            return ""

        return compile_step

    programs = [(f"{model}: {check.label}", check_step(check)) for model, check in checks]
    programs += [(f"20b: LoRA step (attention + experts, rank 8), 2048 tokens (kernels={kernels})", lora_step(kernels))
                 for kernels in ("auto", "xla")]
    compiled = spilled = 0
    for index, (label, compile_program) in enumerate(programs):
        dump = out / "aot_dump" / f"{index:03d}"
        started = time.perf_counter()
        try:
            note = compile_program(dump)
        except Exception as error:  # noqa: BLE001 - the table names each failure and goes on
            lines.append(f"| (failed) | {label} | | | | | {str(error).splitlines()[0][:120]} |")
            continue
        seconds = time.perf_counter() - started
        compiled += 1
        kernels = list(dict.fromkeys(gpu_compile.pallas_kernels(dump)))  # a kernel per layer kind: listed once
        for kernel in kernels:
            spilled += kernel.spill_bytes > 0
            lines.append(f"| {kernel.name} | {label} | {'x'.join(map(str, kernel.grid))} | "
                         f"{kernel.shared_memory:,} B | {kernel.registers} | {kernel.spill_bytes} B | {seconds:.1f} |")
        if not kernels:
            lines.append(f"| (XLA only) | {label}{note} | | | | | {seconds:.1f} |")
        shutil.rmtree(dump, ignore_errors=True)
    lines += ["", f"aot: {compiled} of {len(programs)} compiled, {spilled} spilled"]
    text = "\n".join(lines) + "\n"
    print(text)
    file = out / f"gpu_check-aot-{gpu.name if gpu.name in gpu_compile.TARGETS else 'target'}.md"
    file.write_text(text)
    print(f"written to {file}")
    return 0 if compiled == len(programs) and not spilled else 1


def write_target_config(out: Path) -> None:
    """This GPU's own target config, as XLA describes the device: what gptoss_jax/targets/ should hold for it."""
    from jax._src.lib import xla_client

    config = xla_client.get_topology_for_devices(jax.devices()).target_config
    (out / "target_config.txtpb").write_text(config)


# ---- the table ---------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes: an end-to-end run on a CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--budget", type=float, default=420, help="seconds; later sections are skipped past it")
    parser.add_argument("--aot", metavar="TARGET", help="compile for this GPU (h100, h200 or a target config file) "
                        "without one, and report each kernel")
    parser.add_argument("--lora-step", help=argparse.SUPPRESS)  # the child process of one LoRA measurement
    args = parser.parse_args()
    if args.aot:
        from gptoss_jax import gpu_compile

        gpu_compile.use_cpu_platform()
        args.out.mkdir(parents=True, exist_ok=True)
        return compile_ahead(args.aot, args.out)
    s = sizes(args.small)
    if args.lora_step:
        print(json.dumps(lora_step(s, args.lora_step)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[tuple[str, str, str, str, float]] = []
    sections = [("kernels", lambda: check_kernels(s, rows)),
                ("benchmark", lambda: run_benchmark(s, rows, args.out)),
                ("inference", lambda: measure_inference(s, rows)),
                ("lora", lambda: measure_lora(s, rows, "xla", args.small)),
                ("lora", lambda: measure_lora(s, rows, s.kernel_mode, args.small))]
    for name, section in sections:
        if time.perf_counter() - started > args.budget:
            rows.append((name, "(skipped)", "SKIPPED", f"past the {args.budget:.0f} s budget", 0.0))
            continue
        try:
            section()
        except Exception as error:  # noqa: BLE001 - one failed section must not hide the others' results
            rows.append((name, "(failed)", "FAILED", f"{type(error).__name__}: {str(error).splitlines()[0][:150]}",
                         0.0))
            traceback.print_exc()
    device = jax.devices()[0]
    if device.platform == "gpu":
        try:
            write_target_config(args.out)
        except Exception:  # noqa: BLE001 - a convenience; the measurements stand without it
            traceback.print_exc()
    header = (f"gptoss-jax GPU check, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC: "
              f"{device.device_kind} ({device.platform}, {platform.machine()}), jax {jax.__version__}"
              f"{', --small' if args.small else ''}; {time.perf_counter() - started:.0f} s in all")
    table = [header, "", "| section | what | result | figures | seconds |", "|---|---|---|---|---:|"]
    table += [f"| {section} | {what} | {result} | {figures} | {seconds:.1f} |"
              for section, what, result, figures, seconds in rows]
    text = "\n".join(table) + "\n"
    print(text)
    file = args.out / f"gpu_check-{device.platform}{'-small' if args.small else ''}.md"
    file.write_text(text)
    print(f"written to {file}")
    return 0 if all(row[2] in ("ok", "SKIPPED") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
