"""`gptoss-jax plan`: how much memory a training config needs per device, before any is allocated.

The train step is compiled for abstract inputs of the config's shapes and shardings (nothing of the model's size
exists); XLA's buffer assignment then gives the per-device bytes of its arguments (parameters, optimizer state,
batch) and of its temporaries (activations and everything else live during the step).

With a GPU target (`target="h100"`, "h200" or a target config file) the step is compiled for that GPU by XLA's
GPU compiler: on this machine's GPUs when it has them, else deviceless, on a topology of as many GPUs as the mesh
asks (`gptoss_jax.gpu_compile`), and the figures are XLA GPU's own buffer assignment.

Without a target the figures come from the compiler of the machine that runs `plan`. A CPU compile of a bfloat16
step is not a GPU's: XLA's CPU backend turns the bfloat16 arrays a loop reads (the layer stacks of weights, the
saved activations) into float32 copies before the loop, where a GPU reads bfloat16 directly — about 2.6 GiB more
for gpt-oss-20b. On a CPU those copies are found in the compiled program and reported, and the GPU figure is the
total without them; it is an estimate that errs high (fusion and buffer reuse differ a little between the two,
and the CPU makes other, smaller float32 copies inside its loops that are not subtracted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gptoss_jax import GptOss, GptOssConfig, backend, gpu_compile, hub, lora
from gptoss_jax.checkpoint import open_checkpoint
from gptoss_jax.model import LoRAParam
from gptoss_jax.sharding import MESH_AXES, param_shardings
from gptoss_jax.train import grpo, trainer
from gptoss_jax.train.run import lora_config, make_mesh, make_optimizer, run_time_choices

log = logging.getLogger(__name__)
# The released checkpoints, by hub id, and the built-in presets that are their configuration (MXFP4 experts).
RELEASED = {"openai/gpt-oss-20b": "gpt_oss_20b", "openai/gpt-oss-120b": "gpt_oss_120b"}


@dataclasses.dataclass
class Plan:
    devices: int
    frozen_bytes: int  # per device: parameters that do not train (the base, for LoRA)
    trainable_bytes: int  # per device: trained parameters (master copy)
    optimizer_bytes: int  # per device: optimizer state
    batch_bytes: int  # per device
    temporary_bytes: int  # per device: activations and other buffers live during the step, as compiled here
    device_memory: int
    host_bytes: int = 0  # per device: what the step keeps in host memory (activations offloaded by remat)
    platform: str = "gpu"  # what the step was compiled for
    compiled_for: str = ""  # the device, in words (a GPU target's name, and whether it was present)
    cpu_copy_bytes: int = 0  # of the temporaries: float32 copies of bfloat16 arrays only a CPU compile makes
    # GRPO: the rollouts' KV cache, the policy in the model's dtypes and the generation temporaries (the largest
    # of prefill's and a decode step's), live while sampling — not during the update, whose batch and
    # temporaries the fields above are; and of them, the CPU's float32 copies
    rollout_bytes: int = 0
    rollout_cpu_copy_bytes: int = 0
    program: str = dataclasses.field(default="", repr=False)  # the compiled step's optimized HLO (for its roofline)

    @property
    def _persistent_bytes(self) -> int:
        return self.frozen_bytes + self.trainable_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        """The step's memory as compiled here: what stays, plus the larger of the update and the rollouts."""
        return self._persistent_bytes + max(self.batch_bytes + self.temporary_bytes, self.rollout_bytes)

    @property
    def gpu_bytes(self) -> int:
        """The step's memory on a GPU: as compiled, less the copies only XLA's CPU backend makes."""
        return self._persistent_bytes + max(self.batch_bytes + self.temporary_bytes - self.cpu_copy_bytes,
                                            self.rollout_bytes - self.rollout_cpu_copy_bytes)

    def report(self) -> str:
        gib = 2**30
        rows = [("frozen parameters", self.frozen_bytes), ("trainable parameters", self.trainable_bytes),
                ("optimizer state", self.optimizer_bytes), ("batch", self.batch_bytes),
                ("activations and temporaries", self.temporary_bytes)]
        copies = "of which float32 copies of bf16 arrays"
        lines = [f"per device, {self.devices} device(s), compiled for {self.compiled_for or self.platform}:"]
        lines += [f"  {name:42s} {size / gib:9.2f} GiB" for name, size in rows]
        if self.platform == "cpu":
            lines.append(f"    {copies:40s} {self.cpu_copy_bytes / gib:9.2f} GiB   "
                         "(XLA's CPU backend makes them for its loops; a GPU reads bf16 directly)")
        if self.host_bytes:
            lines.append(f"  {'host memory (offloaded activations)':42s} {self.host_bytes / gib:9.2f} GiB   "
                         "(pinned host memory, not the device's)")
        if self.rollout_bytes:
            lines.append(f"  {'rollouts: KV cache, policy, generation':42s} {self.rollout_bytes / gib:9.2f} GiB   "
                         "(not live during the update: the larger of the two counts)")
            if self.platform == "cpu":
                lines.append(f"    {copies:40s} {self.rollout_cpu_copy_bytes / gib:9.2f} GiB")
        if self.platform == "cpu":
            lines += [f"  {'total on this CPU':42s} {self.total_bytes / gib:9.2f} GiB",
                      f"  {'total on a GPU (estimate: without them)':42s} {self.gpu_bytes / gib:9.2f} GiB"]
        else:
            lines.append(f"  {'total':42s} {self.total_bytes / gib:9.2f} GiB")
        verdict = "fits" if self.gpu_bytes <= self.device_memory else "does NOT fit"
        lines.append(f"  {verdict} in {self.device_memory / gib:.1f} GiB")
        return "\n".join(lines)


def _devices_needed(config: ml_collections.ConfigDict) -> int:
    sizes = [config.mesh[axis] for axis in MESH_AXES]
    return math.prod(s for s in sizes if s != -1)


def plan(config: ml_collections.ConfigDict, *, device_memory: int | None = None, target: str | None = None,
         dump_to: str | None = None) -> Plan:
    """The per-device memory of the config's step, compiled for this machine's devices or for a GPU `target`
    ("h100", "h200" or a target config file); `device_memory` defaults to the target's (80 GiB without one).
    dump_to: a folder for the compiler's dumps of the step (PTX, thunks: `gpu_compile.pallas_kernels` reads them)."""
    needed = _devices_needed(config)
    if target is not None:
        gpu = gpu_compile.target(target)
        devices, present = gpu_compile.devices(gpu, needed)
        platform = "gpu"
        compiled_for = f"{gpu.description} ({'this machine' if present else 'deviceless'})"
        device_memory = device_memory or gpu.memory
        tracing = backend.compiling_for("gpu")
    else:
        devices, platform, compiled_for = None, jax.devices()[0].platform, ""
        device_memory = device_memory or 80 * 2**30
        tracing = contextlib.nullcontext()
        if jax.device_count() < needed and platform == "cpu":
            raise ValueError(f"config.mesh needs {needed} devices; run plan with "
                             f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} on a CPU")
    with tracing:
        return _plan(config, make_mesh(config, devices), device_memory, platform, compiled_for,
                     gpu_compile.compiler_options(dump_to=dump_to))


def _plan(config: ml_collections.ConfigDict, mesh, device_memory: int, platform: str, compiled_for: str,
          options: dict) -> Plan:
    if config.model.checkpoint:
        architecture, quantized = _architecture(config.model.checkpoint)
        packed = quantized and config.model.mxfp4 == "packed"
    else:
        architecture = getattr(GptOssConfig, config.model.preset)()
        packed = config.lora.enabled and config.model.mxfp4 == "packed"
    architecture = architecture.replace(**run_time_choices(config))

    def build():
        model = GptOss(architecture, dtype=config.model.compute_dtype, mxfp4_experts=packed, rngs=nnx.Rngs(0))
        if config.lora.enabled:
            lora.add_lora(model, lora_config(config), rngs=nnx.Rngs(1))
        return model

    model = nnx.eval_shape(build)
    model.use_mesh(mesh)
    shardings = param_shardings(model, mesh)
    trainable = LoRAParam if config.lora.enabled else nnx.Param
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    param_shards, frozen_shards = _split_like(shardings, params, frozen)
    dtypes = jax.tree.map(lambda a: a.dtype, params)
    master = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, jnp.dtype(config.model.param_dtype), sharding=s),
                          params, param_shards)
    frozen = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), frozen, frozen_shards)
    transform, schedule = make_optimizer(config, master)
    init = jax.jit(transform.init).lower(master).compile()
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # state made from nothing (the step count) is placed on the default device: it goes beside the rest
    opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=s if s.device_set == set(mesh.devices.flat) else replicated),
        jax.eval_shape(transform.init, master), init.output_shardings)
    rollout = {}
    if config.method == "grpo":
        rows = config.grpo.prompts_per_step * config.grpo.group_size
        length = grpo.update_length(config.grpo.max_prompt_tokens, config.grpo.max_completion_tokens)
        batch = _abstract_batch(mesh, rows, length, (("counted", jnp.bool_),))
        advantages = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=batch["inputs"].sharding)
        steps = grpo.make_policy_steps(graphdef, dtypes, transform, grpo.loss_settings(config),
                                       remat=config.model.remat,
                                       micro_batches=config.optimizer.grad_accum)
        logprobs = jax.ShapeDtypeStruct((rows, length), jnp.float32, sharding=batch["inputs"].sharding)
        known = logprobs if config.grpo.inner_steps > 1 else None
        reference = logprobs if config.grpo.beta > 0 else None
        compiled = steps.update.lower(master, opt_state, frozen, batch, known, reference, advantages).compile(options)
        rollout = _rollout_memory(model, graphdef, master, dtypes, frozen, mesh, config.grpo.prompts_per_step, rows,
                                  config.grpo.max_prompt_tokens,
                                  config.grpo.max_prompt_tokens + config.grpo.max_completion_tokens, platform)
    else:
        rows = config.data.batch_size * config.optimizer.grad_accum
        batch = _abstract_batch(mesh, rows, config.data.seq_len, (("weights", jnp.float32),))
        steps = trainer.make_steps(config, graphdef, dtypes, transform, schedule)
        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
        compiled = steps.train.lower(master, opt_state, frozen, batch, step).compile(options)
    return Plan(
        devices=mesh.size,
        frozen_bytes=_per_device(frozen),
        trainable_bytes=_per_device(master),
        optimizer_bytes=_per_device(opt_state),
        batch_bytes=_per_device(batch),
        temporary_bytes=int(compiled.memory_analysis().temp_size_in_bytes),
        host_bytes=int(compiled.memory_analysis().host_temp_size_in_bytes),
        device_memory=device_memory,
        platform=platform,
        compiled_for=compiled_for,
        cpu_copy_bytes=cpu_float32_copies(compiled.as_text()) if platform == "cpu" else 0,
        program=compiled.as_text(),
        **rollout,
    )


def _abstract_batch(mesh, rows: int, length: int, extra) -> dict[str, jax.ShapeDtypeStruct]:
    """A training batch's abstract arrays [rows, length], rows over data x fsdp: tokens, positions, segments and
    the step's own `extra` (name, dtype)."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    names = (("inputs", jnp.int32), ("targets", jnp.int32), ("segment_ids", jnp.int32), ("positions", jnp.int32))
    return {name: jax.ShapeDtypeStruct((rows, length), dtype, sharding=sharding) for name, dtype in (*names, *extra)}


def _rollout_memory(model, graphdef, master, dtypes, frozen, mesh, prompts: int, rows: int, prompt_length: int,
                    capacity: int, platform: str) -> dict:
    """The rollouts' bytes per device: the policy in the model's dtypes (where they differ from the master
    copy's), the KV cache of `rows` sequences of `capacity` positions, and the larger of the prefill of the
    `prompts` distinct prompts (of `prompt_length`; their rows share it) with its own cache, and a decode step's
    temporaries (each with its CPU-only float32 copies)."""
    from gptoss_jax.engine import cache_shardings, compiled_steps

    policy = jax.tree.map(lambda a, d: jax.ShapeDtypeStruct(a.shape, d, sharding=a.sharding), master, dtypes)
    cast_bytes = _per_device(policy) if any(a.dtype != d for a, d in zip(
        jax.tree.leaves(master), jax.tree.leaves(dtypes), strict=True)) else 0
    merged = nnx.merge(graphdef, policy, frozen)
    state = nnx.state(merged)
    prefill, decode, _ = compiled_steps(nnx.graphdef(merged))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def cache_of(count):
        cache = jax.eval_shape(lambda: model.init_cache(jnp.zeros(count, jnp.int32), capacity))
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), cache,
                            cache_shardings(cache, mesh))

    def phase(step, tokens, cache, extra):
        compiled = step.lower(state, jax.ShapeDtypeStruct(tokens, jnp.int32, sharding=replicated), cache).compile()
        copies = cpu_float32_copies(compiled.as_text()) if platform == "cpu" else 0
        return int(compiled.memory_analysis().temp_size_in_bytes) + extra, copies

    full = cache_of(rows)
    shared = cache_of(prompts)
    temporaries, copies = max(phase(prefill, (prompts, prompt_length), shared, _per_device(shared)),
                              phase(decode, (rows,), full, 0))
    return {"rollout_bytes": cast_bytes + _per_device(full) + temporaries, "rollout_cpu_copy_bytes": copies}


def cpu_float32_copies(hlo: str) -> int:
    """Bytes of the float32 copies of bfloat16 arrays that XLA's CPU backend makes for its loops: before a loop
    (the layer loop, the backward's) it converts the bf16 arrays the loop reads — weight stacks, saved
    activations — and the loop slices the copy, where a GPU's loop reads the bf16 array. Found in the compiled
    program's entry computation: every such copy that a loop takes. (The CPU also keeps some values of a loop
    body in float32; those are not counted, so the GPU figure errs high.)"""
    converting = {name for name, body in re.findall(
        r"^%(\S+) \(param_0[^:]*: bf16\[[^\]]*\]\) -> f32\[[^\]]*\] \{\n(.*?)\n\}", hlo, re.M | re.S)
        if body.count("\n") == 1 and " convert(" in body.splitlines()[-1]}
    entry = hlo[hlo.index("\nENTRY "):]
    copies = {name: 4 * math.prod(int(d) for d in shape.split(",") if d) for name, shape, callee in re.findall(
        r"%(\S+) = f32\[([\d,]*)\]\{[^}]*\} fusion\([^)]*\), kind=\w+, calls=%([^,\s]+)", entry)
        if callee in converting}
    tuples = dict(re.findall(r"%(\S+) = \(.*\) tuple\(([^)]*)\)", entry))
    taken = {operand.strip().lstrip("%") for init in re.findall(r"\) while\(%(\S+?)\)", entry)
             for operand in tuples.get(init, "").split(",")}
    return sum(size for name, size in copies.items() if name in taken)


def _architecture(checkpoint: str) -> tuple[GptOssConfig, bool]:
    """(the checkpoint's architecture, whether its experts are MXFP4) from its config files alone (a plan needs no
    weights). A released checkpoint the hub cannot give (offline, not cached) is its built-in preset, said so."""
    if Path(checkpoint).exists() or not hub.is_repo_id(checkpoint):
        opened = open_checkpoint(checkpoint)
        return opened.config, opened.experts_quantized
    try:
        opened = open_checkpoint(hub.snapshot(checkpoint, allow_patterns=["config.json", "original/config.json"]))
    except OSError as error:
        if checkpoint not in RELEASED:
            raise
        log.warning("%s: its config.json is not reachable (%s); planning with the built-in %s preset, which is "
                    "the released configuration (MXFP4 experts)", checkpoint, str(error).rsplit(": ", 1)[-1],
                    RELEASED[checkpoint])
        return getattr(GptOssConfig, RELEASED[checkpoint])(), True
    return opened.config, opened.experts_quantized


def _split_like(shardings: nnx.State, *parts: nnx.State) -> list[nnx.State]:
    """`shardings` cut into the same parts (by path) as the parameter states."""
    flat = dict(nnx.to_flat_state(shardings))
    return [nnx.from_flat_state([(path, flat[path]) for path, _ in nnx.to_flat_state(part)]) for part in parts]


def _per_device(tree) -> int:
    """Bytes of one device's shard of every leaf."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
    return total
