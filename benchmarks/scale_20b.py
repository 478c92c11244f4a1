"""gpt-oss-20b at its released size on this machine: memory (peak RSS, from the OS) and time.

A random checkpoint with the released shapes in the released HF-MXFP4 layout (config.json as on the hub, the
three `model-0000N-of-00002.safetensors` shards and their index; 13 GB) is built once, deterministically, and
cached. It is written here with safetensors directly, not by gptoss_jax, so loading it is a real test of the
reader. Then, each in its own process (whose peak resident set, VmHWM, is what counts):

  generate      load_model + greedy generation of 32 tokens from a 256-token prompt; decode speed (the median
                step after the first, which compiles) beside the bound set by the bytes a token reads and the
                machine's copy bandwidth
  lora          one LoRA step (attention + experts, rank 16) at 512 tokens, from configs/train/gpt_oss_20b_lora.py
  plan          `gptoss-jax plan`'s figure for that same step
  transformers  AutoModelForCausalLM.from_pretrained on the same directory (the peer dequantizes MXFP4 to bf16
                on a CPU); stopped when its resident set passes --peer-limit GiB

    python benchmarks/scale_20b.py [--cache DIR] [--parts generate,lora,plan,transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from released import hub_config  # noqa: E402

GIB = 2**30
VERSION = "1"  # bump when the generated weights change

CONFIG = hub_config(layers=24, experts=32)  # config.json of openai/gpt-oss-20b on the hub
SHARD_LAYERS = [range(0, 8), range(8, 16), range(16, 24)]  # the embedding goes first, the head last


# ---- the checkpoint ------------------------------------------------------------------------------------------


def _tensors_of_layer(layer: int) -> dict[str, tuple[tuple[int, ...], str]]:
    d, heads, kv, hd, e, f = 2880, 64, 8, 64, 32, 2880
    p = f"model.layers.{layer}."
    return {
        p + "input_layernorm.weight": ((d,), "norm"), p + "post_attention_layernorm.weight": ((d,), "norm"),
        p + "self_attn.q_proj.weight": ((heads * hd, d), "weight"),
        p + "self_attn.q_proj.bias": ((heads * hd,), "bias"),
        p + "self_attn.k_proj.weight": ((kv * hd, d), "weight"), p + "self_attn.k_proj.bias": ((kv * hd,), "bias"),
        p + "self_attn.v_proj.weight": ((kv * hd, d), "weight"), p + "self_attn.v_proj.bias": ((kv * hd,), "bias"),
        p + "self_attn.o_proj.weight": ((d, heads * hd), "weight"), p + "self_attn.o_proj.bias": ((d,), "bias"),
        p + "self_attn.sinks": ((heads,), "sinks"),
        p + "mlp.router.weight": ((e, d), "weight"), p + "mlp.router.bias": ((e,), "bias"),
        p + "mlp.experts.gate_up_proj_blocks": ((e, 2 * f, d // 32, 16), "blocks"),
        p + "mlp.experts.gate_up_proj_scales": ((e, 2 * f, d // 32), "scales"),
        p + "mlp.experts.gate_up_proj_bias": ((e, 2 * f), "bias"),
        p + "mlp.experts.down_proj_blocks": ((e, d, f // 32, 16), "blocks"),
        p + "mlp.experts.down_proj_scales": ((e, d, f // 32), "scales"),
        p + "mlp.experts.down_proj_bias": ((e, d), "bias"),
    }


def _shards() -> list[dict[str, tuple[tuple[int, ...], str]]]:
    vocab, d = CONFIG["vocab_size"], CONFIG["hidden_size"]
    shards = []
    for number, layers in enumerate(SHARD_LAYERS):
        tensors = {"model.embed_tokens.weight": ((vocab, d), "weight")} if number == 0 else {}
        for layer in layers:
            tensors.update(_tensors_of_layer(layer))
        if number == len(SHARD_LAYERS) - 1:
            tensors.update({"model.norm.weight": ((d,), "norm"), "lm_head.weight": ((vocab, d), "weight")})
        shards.append(tensors)
    return shards


def _value(name: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """Deterministic random values by tensor name, of the magnitudes a trained model has."""
    import ml_dtypes

    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if kind == "blocks":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if kind == "scales":  # 2**-8 .. 2**-6: expert weights of order 0.02-0.1, like the released ones
        return rng.integers(119, 122, shape, dtype=np.uint8)
    scale, offset = {"weight": (0.02, 0.0), "bias": (0.02, 0.0), "norm": (0.1, 1.0), "sinks": (1.0, 0.0)}[kind]
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= scale
    values += offset
    return values.astype(ml_dtypes.bfloat16)


def build(directory: Path) -> Path:
    """Writes the checkpoint once; a complete one (marked by its `.complete` file) is reused."""
    import safetensors.numpy

    marker = directory / ".complete"
    if marker.is_file() and marker.read_text() == VERSION:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    weight_map, total = {}, 0
    for number, tensors in enumerate(_shards()):
        file = f"model-{number:05d}-of-{len(SHARD_LAYERS) - 1:05d}.safetensors"
        arrays = {name: _value(name, shape, kind) for name, (shape, kind) in tensors.items()}
        safetensors.numpy.save_file(arrays, directory / file, metadata={"format": "pt"})
        total += sum(a.nbytes for a in arrays.values())
        weight_map.update(dict.fromkeys(arrays, file))
        print(f"  wrote {file} ({sum(a.nbytes for a in arrays.values()) / GIB:.2f} GiB)", flush=True)
        del arrays
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=2))
    marker.write_text(VERSION)
    print(f"built {directory} ({total / GIB:.2f} GiB) in {time.perf_counter() - started:.0f} s", flush=True)
    return directory


# ---- the parts, each in its own process ----------------------------------------------------------------------


def peak_rss(field: str = "VmHWM") -> int:
    """This process's peak resident set (VmHWM; VmRSS: the current one) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def stage(name: str) -> None:
    """Memory at a point of a part, on stderr (the parent shows it)."""
    print(f"  {name}: resident {peak_rss('VmRSS') / GIB:.2f} GiB, peak {peak_rss() / GIB:.2f} GiB", file=sys.stderr,
          flush=True)


def copy_bandwidth() -> float:
    """Bytes read plus bytes written per second copying 1 GiB between two existing arrays (STREAM's copy)."""
    source = np.ones(GIB // 8)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best


def bytes_per_token(config) -> int:
    """The bytes a decoded token reads at least: every layer's attention and router weights (bf16), its four
    experts (MXFP4: 4.25 bits a value, bias bf16), the norms, one embedding row and the unembedding."""
    d, v = config.hidden_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    attention = 2 * (d * (q + 2 * kv) + q * d + q + 2 * kv + d) + 4 * config.num_attention_heads
    expert = (d * 2 * config.intermediate_size + config.intermediate_size * d) * 17 // 32 \
        + 2 * (2 * config.intermediate_size + d)
    router = 2 * (d * config.num_experts + config.num_experts)
    layer = attention + router + config.experts_per_token * expert + 2 * 4 * d
    return config.num_hidden_layers * layer + 2 * (v * d + d) + 4 * d


def part_generate(directory: Path) -> dict:
    import gptoss_jax
    from gptoss_jax.generation import Generator

    start = time.perf_counter()
    model = gptoss_jax.load_model(directory)
    load_seconds = time.perf_counter() - start
    after_load = peak_rss()
    stage("model loaded")
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, 256).tolist()
    stamps = []
    start = time.perf_counter()
    Generator(model).generate([prompt], 32, stop_tokens=[], stream=lambda row, token: stamps.append(
        time.perf_counter()))
    # the first decode step compiles the step: timed apart, and the rate is the median of the others
    steps = np.diff(stamps)
    decode = float(np.median(steps[1:]))
    bound = bytes_per_token(model.config) / copy_bandwidth()
    return {"load_s": load_seconds, "first_token_s": stamps[0] - start, "first_decode_step_s": float(steps[0]),
            "decode_s_per_token": decode,
            "decode_bound_s_per_token": bound, "peak_rss_after_load": after_load, "peak_rss": peak_rss()}


def _lora_config(directory: Path):
    from gptoss_jax.train.config import load_config

    return load_config(ROOT / "configs" / "train" / "gpt_oss_20b_lora.py", [
        f"--config.model.checkpoint={directory}", "--config.lora.rank=16", "--config.data.seq_len=512",
        "--config.data.batch_size=1", "--config.optimizer.grad_accum=1"])


def part_lora(directory: Path) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gptoss_jax.model import LoRAParam
    from gptoss_jax.train import trainer

    config = _lora_config(directory)
    model = trainer.build_model(config, trainer.make_mesh(config))
    stage("model loaded, adapters added")
    graphdef, params, frozen = nnx.split(model, LoRAParam, ...)
    del model
    dtypes = jax.tree.map(lambda a: a.dtype, params)
    master = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    transform, schedule = trainer.make_optimizer(config, master)
    state = {"master": master, "opt": transform.init(master)}
    del params, master
    stage("optimizer state made")
    steps = trainer.make_steps(config, graphdef, dtypes, transform, schedule)
    length = config.data.seq_len
    tokens = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (1, length + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((1, length), np.float32),
             "segment_ids": np.ones((1, length), np.int32), "positions": np.arange(length, dtype=np.int32)[None]}
    times = []
    for step in range(2):
        start = time.perf_counter()
        state["master"], state["opt"], metrics = steps.train(state["master"], state["opt"], frozen, batch,
                                                               jnp.int32(step))
        loss = float(metrics["loss"])
        times.append(time.perf_counter() - start)
        stage(f"step {step} done")
    return {"first_step_s": times[0], "step_s": times[1], "loss": loss, "peak_rss": peak_rss()}


def part_plan(directory: Path) -> dict:
    from gptoss_jax.train.plan import plan

    result = plan(_lora_config(directory), device_memory=24 * GIB)
    print(result.report(), file=sys.stderr)
    return {"plan_bytes": result.total_bytes, "peak_rss": peak_rss()}


def part_transformers(directory: Path) -> dict:
    import torch
    import transformers

    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    return {"load_s": time.perf_counter() - start, "parameter_bytes": sum(
        p.numel() * p.element_size() for p in model.parameters()), "peak_rss": peak_rss()}


PARTS = {"generate": part_generate, "lora": part_lora, "plan": part_plan, "transformers": part_transformers}


def run_part(name: str, directory: Path, limit: int) -> dict:
    """Runs one part in a child process; stops it if its resident set passes `limit` bytes."""
    child = subprocess.Popen([sys.executable, __file__, "--child", name, "--cache", str(directory)],
                             stdout=subprocess.PIPE, text=True)  # its stderr (the stages) passes through
    watched, start = 0, time.perf_counter()
    while child.poll() is None:
        try:
            rss = int(Path(f"/proc/{child.pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (FileNotFoundError, ProcessLookupError):
            break
        watched = max(watched, rss)
        if rss > limit:
            child.kill()
            child.wait()
            return {"stopped": f"resident set passed {limit / GIB:.0f} GiB after {time.perf_counter() - start:.0f} s",
                    "peak_rss": watched}
        time.sleep(0.2)
    output = child.stdout.read()
    if child.wait() != 0:
        return {"failed": f"exit code {child.returncode}", "peak_rss": watched}
    return json.loads(output.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "XDG_CACHE_HOME", Path.home() / ".cache")) / "gptoss_jax" / "random-gpt-oss-20b")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--peer-limit", type=float, default=21, help="GiB at which the peer's load is stopped")
    parser.add_argument("--limit", type=float, default=22.5, help="GiB at which any part is stopped (the machine's "
                        "memory less what the system needs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(PARTS[args.child](args.cache)))
        return
    directory = build(args.cache)
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GIB:.0f} GiB; checkpoint {directory}")
    results = {}
    for name in args.parts.split(","):
        limit = (args.peer_limit if name == "transformers" else args.limit) * GIB
        results[name] = run_part(name, directory, limit)
        print(f"{name}: " + ", ".join(f"{key} {_show(key, value)}" for key, value in results[name].items()),
              flush=True)
    if "generate" in results and "decode_s_per_token" in results["generate"]:
        g = results["generate"]
        share = g["decode_bound_s_per_token"] / g["decode_s_per_token"]
        print(f"decode: {1 / g['decode_s_per_token']:.2f} tok/s = {share:.0%} "
              f"of the bound ({1 / g['decode_bound_s_per_token']:.2f} tok/s)")
    if "plan_bytes" in results.get("plan", {}) and "step_s" in results.get("lora", {}):
        measured, planned = results["lora"]["peak_rss"], results["plan"]["plan_bytes"]
        print(f"LoRA step: measured peak {measured / GIB:.2f} GiB, plan {planned / GIB:.2f} GiB "
              f"({planned / measured - 1:+.0%})")


def _show(key: str, value) -> str:
    if key.endswith(("rss", "bytes", "rss_after_load")):
        return f"{value / GIB:.2f} GiB"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
