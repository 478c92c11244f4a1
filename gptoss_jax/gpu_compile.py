"""Compiling for an NVIDIA GPU that is not here, and what the compiled program tells.

jax's CUDA plugin compiles for a GPU described by a *target config* — a text proto of XLA's `gpu_device_info`
(compute capability, SMs, shared memory, registers, memory size and bandwidth) — with no GPU and no driver: XLA's
GPU compiler, Triton for the Pallas kernels and ptxas for the machine code all run on the CPU (the `gpu-compile`
extra: `jax-cuda12-plugin` and `nvidia-cuda-nvcc-cu12`, which carries ptxas). jax must start with the CPU as its
only platform, or the plugin's runtime tries to start and fails without a driver: `JAX_PLATFORMS=cpu`, or
`use_cpu_platform()` before jax's first computation. Traces run inside `backend.compiling_for("gpu")`, so the model
takes its GPU path (`kernels="auto"` means the Pallas kernels).

What a deviceless compile proves: the program compiles for that GPU, every kernel's shared memory fits, and (with
`spills_as_errors`) no kernel spills registers; `memory_analysis()` is XLA GPU's own buffer assignment. What it
cannot prove: numerics on the device, runtime faults, speed.

Shipped targets (`TARGETS`): h100 and h200, in `gptoss_jax/targets/` (each file says where its figures come from).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import jax

from gptoss_jax import backend
from gptoss_jax.config import GptOssConfig

TARGETS_DIR = Path(__file__).resolve().parent / "targets"
TARGETS = {"h100": TARGETS_DIR / "h100.txtpb", "h200": TARGETS_DIR / "h200.txtpb"}


class GpuCompileError(ValueError):
    """Compiling for a GPU is not possible here (no plugin, jax already started on another platform, a bad
    target config)."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # "h100", "h200", or the config file's path
    config: str  # the gpu_device_info text proto
    description: str  # the device's own name, e.g. "NVIDIA H100 80GB HBM3"
    memory: int  # bytes of device memory
    bandwidth: float  # bytes/s of device memory
    matmul_flops: float | None  # dense bf16 tensor-core FLOP/s (the file's `# bf16 dense FLOP/s:` line), if given
    compute_capability: str  # e.g. "9.0"


def target(name_or_path: str) -> Target:
    """A shipped target by name ("h100", "h200") or a target config file."""
    path = TARGETS.get(name_or_path.lower(), Path(name_or_path))
    if not path.is_file():
        raise GpuCompileError(f"--target {name_or_path!r}: expected one of {sorted(TARGETS)} or a target config file "
                              "(a gpu_device_info text proto)")
    text = path.read_text()

    def field(key: str, kind=float, pattern=r"([0-9.e+]+)"):
        found = re.search(rf"^\s*{key}\s*:\s*{pattern}", text, re.M)
        if not found:
            raise GpuCompileError(f"{path}: no `{key}` in the target config")
        return kind(found.group(1))

    capability = re.search(r"cuda_compute_capability\s*\{([^}]*)\}", text)
    if not capability:
        raise GpuCompileError(f"{path}: no `cuda_compute_capability` in the target config")
    major = re.search(r"major:\s*(\d+)", capability.group(1))
    minor = re.search(r"minor:\s*(\d+)", capability.group(1))
    rate = re.search(r"^#\s*bf16 dense FLOP/s:\s*([0-9.e+]+)", text, re.M)
    return Target(name=name_or_path if name_or_path.lower() not in TARGETS else name_or_path.lower(), config=text,
                  description=field("device_description_str", str, r'"([^"]*)"'),
                  memory=field("device_memory_size", int), bandwidth=field("memory_bandwidth"),
                  matmul_flops=float(rate.group(1)) if rate else None,
                  compute_capability=f"{major.group(1) if major else 0}.{minor.group(1) if minor else 0}")


def use_cpu_platform() -> bool:
    """Makes the CPU jax's only platform where jax's CUDA plugin is installed but cannot run (no NVIDIA driver) and
    the choice is still open (JAX_PLATFORMS unset, jax not started): what compiling for an absent GPU needs, and
    what jax would fall back to anyway, after printing the plugin's failure. Returns whether it did."""
    from jax._src import xla_bridge

    if (os.environ.get("JAX_PLATFORMS") or xla_bridge.backends_are_initialized() or _has_driver()
            or not cuda_plugin_installed() or importlib.util.find_spec("libtpu")):
        return False
    jax.config.update("jax_platforms", "cpu")
    return True


def cuda_plugin_installed() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax plugin at all
        return False


def _has_driver() -> bool:
    return Path("/proc/driver/nvidia/version").exists()


def devices(gpu: Target, count: int) -> tuple[list[jax.Device], bool]:
    """`count` devices to compile for, and whether they are real: this machine's GPUs when it has that many of the
    target's kind (the figures are then the device's own), else a deviceless topology of `count` GPUs of the target
    on one host."""
    if (jax.default_backend() == "gpu" and jax.device_count() >= count
            and jax.devices()[0].device_kind == gpu.description):
        return jax.devices()[:count], True
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=gpu.config, topology=f"1x1x{count}")
    except NotImplementedError:
        raise GpuCompileError(
            "compiling for a GPU without one needs jax's CUDA plugin (pip install -e \".[gpu-compile]\") and jax "
            "started with the CPU as its only platform (JAX_PLATFORMS=cpu)") from None
    except Exception as error:  # the plugin's own message, e.g. a malformed target config
        raise GpuCompileError(f"target {gpu.name}: the CUDA plugin refused the target config: {error}") from None
    return list(topology.devices), False


def compiler_options(*, spills_as_errors: bool = False, dump_to: str | os.PathLike | None = None) -> dict:
    """Options for `Lowered.compile`: register spills as errors; the compiler's dumps (PTX, thunks) to a folder."""
    options = {}
    if spills_as_errors:
        options["xla_gpu_fail_ptx_compilation_on_register_spilling"] = True
    if dump_to is not None:
        options["xla_dump_to"] = str(dump_to)
    return options


def compile_for_gpu(lowerable, *args, **options):
    """`lowerable` (a jitted function) traced for the GPU path and compiled with `compiler_options(**options)`."""
    with backend.compiling_for("gpu"):
        return lowerable.trace(*args).lower().compile(compiler_options(**options))


# ---- what CI and benchmarks/gpu_check.sh --aot compile ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Check:
    """A program to compile for a GPU: a jitted function and its abstract arguments (placed by `on_devices`)."""

    label: str
    function: Callable
    arguments: tuple


def kernel_checks(config: GptOssConfig, *, tokens: int = 4096, decode_batch: int = 64, cache: int = 8192,
                  swiglu_block_m: int | None = None) -> list[Check]:
    """Every Pallas kernel at the model's shapes, forward and backward: the MXFP4 grouped matmul with its fused
    SwiGLU (the gate-up projection of `tokens` tokens, and a decode step's few rows), flash attention with sinks
    over `tokens` positions (banded and full), decode attention over a cache of `cache` slots.
    swiglu_block_m: the matmul's row tile (default: its own choice) — the negative control sets one too large."""
    from gptoss_jax.kernels.attention import decode_attention, flash_attention
    from gptoss_jax.kernels.mxfp4_matmul import mxfp4_ragged_matmul
    from gptoss_jax.mxfp4 import BLOCK_SIZE, Mxfp4Weight

    e, d, f = config.num_experts, config.hidden_size, config.intermediate_size
    n, k, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    bf16, shape = jax.numpy.bfloat16, jax.ShapeDtypeStruct
    swiglu = (config.swiglu_alpha, config.swiglu_limit)
    gate_up = Mxfp4Weight(shape((e, 2 * f, d // BLOCK_SIZE, 16), "uint8"), shape((e, 2 * f, d // BLOCK_SIZE), "uint8"))

    def matmul(rows, bias, weight, sizes):
        out = mxfp4_ragged_matmul(rows, weight, sizes, bias, swiglu=swiglu, block_m=swiglu_block_m)
        return jax.numpy.sum(out)

    def flash(window):
        def loss(q, keys, values, sinks, segments):
            out = flash_attention(q, keys, values, sinks, segments, window=window)
            return jax.numpy.sum(out.astype("float32"))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

    def matmul_arguments(pairs):
        return shape((pairs, d), bf16), shape((e, 2 * f), bf16), gate_up, shape((e,), "int32")

    pairs = tokens * config.experts_per_token
    attention = (shape((1, tokens, n, h), bf16), shape((1, tokens, k, h), bf16), shape((1, tokens, k, h), bf16),
                 shape((n,), "float32"), shape((1, tokens), "int32"))
    return [
        Check(f"MXFP4 matmul + SwiGLU, forward and backward, {pairs} rows",
              jax.jit(jax.value_and_grad(matmul, argnums=(0, 1))), matmul_arguments(pairs)),
        Check(f"MXFP4 matmul + SwiGLU, forward, {decode_batch * config.experts_per_token} rows (decode)",
              jax.jit(matmul), matmul_arguments(decode_batch * config.experts_per_token)),
        Check(f"flash attention, banded ({config.sliding_window}), forward and backward, {tokens} positions",
              flash(config.sliding_window), attention),
        Check(f"flash attention, full, forward and backward, {tokens} positions", flash(None), attention),
        Check(f"decode attention, batch {decode_batch}, {cache} slots", jax.jit(decode_attention),
              (shape((decode_batch, 1, n, h), bf16), shape((decode_batch, cache, k, h), bf16),
               shape((decode_batch, cache, k, h), bf16), shape((n,), "float32"),
               shape((decode_batch, cache), "bool"))),
    ]


def inference_checks(config: GptOssConfig, *, prompt: int = 2048, batch: int = 64, cache: int = 4096,
                     ) -> list[Check]:
    """The model's prefill (one prompt of `prompt` tokens) and decode step (`batch` rows, `cache` slots), MXFP4
    experts packed, as `generation.Generator` compiles them."""
    from flax import nnx

    from gptoss_jax.engine import compiled_steps
    from gptoss_jax.model import GptOss

    model = nnx.eval_shape(lambda: GptOss(config, dtype="bfloat16", mxfp4_experts=True, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    prefill, decode, _ = compiled_steps(graphdef)
    tokens = jax.ShapeDtypeStruct
    return [
        Check(f"prefill, {prompt} tokens (kernels={config.kernels})", prefill,
              (state, tokens((1, prompt), "int32"),
               jax.eval_shape(lambda: model.init_cache(jax.numpy.zeros(1, "int32"), prompt)))),
        Check(f"decode step, batch {batch}, {cache} slots (kernels={config.kernels})", decode,
              (state, tokens((batch,), "int32"),
               jax.eval_shape(lambda: model.init_cache(jax.numpy.zeros(batch, "int32"), cache)))),
    ]


def on_devices(tree, devices: list[jax.Device]):
    """Abstract arrays of `tree` replicated over `devices` (one device: placed on it)."""
    mesh = jax.sharding.Mesh(devices, ("devices",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), tree)


def compile_check(check: Check, devices: list[jax.Device], **options):
    """`check` compiled for the GPU path on `devices` (see `compiler_options`)."""
    return compile_for_gpu(check.function, *on_devices(check.arguments, devices), **options)


# ---- the compiled kernels, from the compiler's dump --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One Pallas (Triton) kernel of a compiled program."""

    name: str
    grid: tuple[int, int, int]
    warps: int
    shared_memory: int  # bytes per block, as XLA launches it
    registers: int  # per thread, as ptxas reports them for the target's sm
    spill_bytes: int  # spill stores + spill loads


def pallas_kernels(dump: str | os.PathLike) -> list[Kernel]:
    """The Triton kernels of every program compiled with `dump_to=dump`: grid and warps from the optimized HLO,
    shared memory from the thunk sequence, registers and spills from ptxas on the dumped PTX."""
    dump = Path(dump)
    kernels = []
    for hlo in sorted(dump.glob("*gpu_after_optimizations.txt")):
        module = hlo.name.split(".sm_")[0]
        launched = _launches(hlo.with_name(f"{module}.thunk_sequence.txt"))
        usage = _ptxas_usage(sorted(dump.glob(f"{module}.*.ptx")))
        for name, grid, warps in _triton_calls(hlo):
            registers, spills = usage.get(name, (0, 0))
            kernels.append(Kernel(name, grid, warps, launched.get(name, 0), registers, spills))
    return kernels


def _triton_calls(hlo: Path) -> Iterator[tuple[str, tuple[int, int, int], int]]:
    for x, y, z, name, warps in re.findall(
            r'grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) : i32.*?name = "([^"]+)", '
            r"num_stages = \d+ : i32, num_warps = (\d+) : i32", hlo.read_text()):
        yield name, (int(x), int(y), int(z)), int(warps)


def _launches(thunks: Path) -> dict[str, int]:
    """Kernel name -> shared memory bytes, from a thunk sequence."""
    if not thunks.exists():
        return {}
    return {name: int(shared) for name, shared in re.findall(
        r"kCustomKernel\s+\[[^\]]*\]\s+(\S+) grid: \[[^\]]*\] threads: \[[^\]]*\]\s+shared_memory: (\d+) bytes",
        thunks.read_text())}


def ptxas() -> Path:
    """ptxas from the nvidia-cuda-nvcc wheel (or the PATH)."""
    for entry in sys.path:
        candidate = Path(entry) / "nvidia" / "cuda_nvcc" / "bin" / "ptxas"
        if candidate.is_file():
            return candidate
    found = shutil.which("ptxas")
    if not found:
        raise GpuCompileError("no ptxas: pip install -e \".[gpu-compile]\" (nvidia-cuda-nvcc-cu12 carries it)")
    return Path(found)


def _ptxas_usage(ptx_files: list[Path]) -> dict[str, tuple[int, int]]:
    """Entry name -> (registers, spill bytes) of the PTX files that hold Triton kernels, for the sm each was
    generated for."""
    usage: dict[str, tuple[int, int]] = {}
    for ptx in ptx_files:
        text = ptx.read_text()
        if "global_smem" not in text:  # Triton kernels declare their shared memory so; XLA's do not
            continue
        sm = re.search(r"^\.target\s+(\S+)", text, re.M).group(1)
        report = subprocess.run([str(ptxas()), f"-arch={sm}", "-v", str(ptx), "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
        for name, body in re.findall(r"Compiling entry function '([^']+)'(.*?)(?=Compiling entry function|\Z)",
                                     report, re.S):
            registers = re.search(r"Used (\d+) registers", body)
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
            counted = (int(registers.group(1)) if registers else 0,
                       int(spills.group(1)) + int(spills.group(2)) if spills else 0)
            previous = usage.get(name, (0, 0))
            usage[name] = (max(previous[0], counted[0]), max(previous[1], counted[1]))
    return usage


# ---- a roofline estimate of a compiled program --------------------------------------------------------------------


@dataclasses.dataclass
class Cost:
    """What a compiled program launches, from its optimized HLO (`program_cost`): kernels (thunks that run on the
    device: fusions, library calls, Triton kernels, copies, collectives), their floating-point operations and the
    bytes they move, and a roofline time — each kernel at the slower of its flops at the matmul rate and its bytes
    at the memory bandwidth, plus a launch cost. An estimate from the program, not a measurement."""

    kernels: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    seconds: float = 0.0
    unknown_loops: int = 0  # data-dependent loops that `trips` did not cover (each counted once)
    seconds_by_op: dict[str, float] = dataclasses.field(default_factory=dict)  # roofline time by JAX operation

    def add(self, other: Cost, times: float = 1.0) -> None:
        self.kernels += times * other.kernels
        self.flops += times * other.flops
        self.bytes += times * other.bytes
        self.seconds += times * other.seconds
        self.unknown_loops += other.unknown_loops
        for op, seconds in other.seconds_by_op.items():
            self.seconds_by_op[op] = self.seconds_by_op.get(op, 0.0) + times * seconds

    def costliest(self, count: int = 5) -> list[tuple[str, float]]:
        """The JAX operations (op_name metadata, without the jit and transform prefixes) that take the most of the
        roofline time."""
        return sorted(self.seconds_by_op.items(), key=lambda item: -item[1])[:count]


LAUNCH_SECONDS = 2e-6  # the cost of one kernel launch in the roofline: a few microseconds each, as without graphs
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1, "f4e2m1fn": 0.5,
                "f8e8m0fnu": 1, "c64": 8, "token": 0}
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id",
         "opt-barrier", "add-dependency", "domain", "copy-done", "all-reduce-done", "all-gather-done",
         "collective-permute-done", "send-done", "recv-done", "async-done", "async-update"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\((.*?)\)(.*)$")


def _shape_bytes(text: str) -> float:
    return sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in re.findall(r"\b([a-z]+[0-9a-z]*)\[([\d,]*)\]", text))


@dataclasses.dataclass
class _Instruction:
    name: str
    shape: str
    opcode: str
    arguments: str  # as written between the parentheses
    operands: list[str]  # the instructions named there
    attributes: str


def _computations(hlo: str) -> tuple[dict[str, list[_Instruction]], str]:
    computations, entry, current = {}, "", None
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY )?%(\S+) .*\{$", line)
        if header:
            current = computations.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
            continue
        found = _INSTRUCTION.match(line) if current is not None else None
        if found:
            name, shape, opcode, operands, attributes = found.groups()
            current.append(_Instruction(name, shape, opcode, operands, re.findall(r"%([\w.\-]+)", operands),
                                        attributes))
    return computations, entry


TritonCost = Callable[[str, list[list[int]], tuple[int, int, int]], tuple[float, float]]


def program_cost(hlo: str, gpu: Target, *, trips: dict[str, tuple[float, ...]] | None = None,
                 triton: TritonCost | None = None) -> Cost:
    """The roofline `Cost` of an optimized HLO module (`compiled.as_text()`) on `gpu`.

    Bytes of a kernel: what it reads of its operands (the slices it takes, where a fused operand is only sliced)
    and what it writes (the update, for an in-place update). Flops: the dots (matmuls) it computes. A Triton
    (Pallas) kernel's body is not HLO: `triton(name, operand shapes, grid) -> (flops, bytes)` gives them (the
    kernel's own traffic model), else it counts no flops and its operands and result whole. A loop's body counts
    its trip count times; where the compiler does not know it (a loop of data-dependent length), `trips` gives it
    by the Python function the loop's location names (the one that made it, or its caller where autodiff hides
    it) and how deep the loop sits among that function's loops: {"grouped_matmul": (groups, tiles)} counts the
    outer loop `groups` times and the loops inside it `tiles` times. Else it counts once (and in
    `unknown_loops`). A conditional counts its costliest branch."""
    computations, entry = _computations(hlo)
    made_by = _loop_functions(hlo)
    shapes = {i.name: i.shape for body in computations.values() for i in body}
    rate = gpu.matmul_flops or 0.0

    def kernel(flops: float, moved: float, instruction: _Instruction) -> Cost:
        seconds = max(flops / rate if rate else 0.0, moved / gpu.bandwidth) + LAUNCH_SECONDS
        op = re.search(r'op_name="([^"]*)"', instruction.attributes)
        op = re.sub(r"^(jit\([^)]*\)/)+|(transpose\(|jvp\(|checkpoint/|while/body/|remat/)", "",
                    op.group(1)) if op else instruction.opcode
        return Cost(1, flops, moved, seconds, seconds_by_op={op: seconds})

    def dots(name: str) -> float:
        total = 0.0
        for i in computations.get(name, []):
            if i.opcode == "dot":
                lhs = _dims(shapes[i.operands[0]])
                contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attributes).group(1)
                total += 2 * math.prod(_dims(i.shape)) * math.prod(lhs[int(d)] for d in contracted.split(",") if d)
            for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", i.attributes):
                total += dots(callee)
        return total

    def fused_reads(instruction: _Instruction, fused: str) -> float:
        """Bytes a fusion reads: each operand whole, or only the slices its fused parameter feeds."""
        body = computations[fused]
        params = {int(i.arguments): i.name for i in body if i.opcode == "parameter"}
        reads = 0.0
        for position, operand in enumerate(instruction.operands):
            parameter = params.get(position)
            users = [i for i in body if parameter in i.operands]
            sliced = 0.0
            for user in users:
                if user.opcode in ("dynamic-slice", "slice", "gather") and user.operands[0] == parameter:
                    sliced += _shape_bytes(user.shape)
                elif not (user.opcode == "dynamic-update-slice" and user.operands[0] == parameter):
                    sliced = _shape_bytes(shapes.get(operand, ""))  # used whole
                    break
            reads += sliced  # (an operand only updated in place is neither read nor written but for the update)
        return reads

    def fused_writes(instruction: _Instruction, fused: str) -> float:
        root = computations[fused][-1] if computations[fused] else None
        if root is not None and root.opcode == "dynamic-update-slice":
            return _shape_bytes(shapes[root.operands[1]])
        return _shape_bytes(instruction.shape)

    def trip_count(instruction: _Instruction, enclosing: tuple[str, ...]) -> tuple[float | None, str]:
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', instruction.attributes)
        frame = re.search(r"stack_frame_id=(\d+)", instruction.attributes)
        function = made_by.get(int(frame.group(1)), "") if frame else ""
        if known:
            return float(known.group(1)), function
        counts = (trips or {}).get(function)
        depth = enclosing.count(function)
        return (counts[min(depth, len(counts) - 1)] if counts else None), function

    def cost_of(name: str, enclosing: tuple[str, ...] = ()) -> Cost:
        total = Cost()
        for i in computations.get(name, []):
            if i.opcode in _FREE:
                continue
            if i.opcode == "while":
                body = re.search(r"body=%([\w.\-]+)", i.attributes).group(1)
                condition = re.search(r"condition=%([\w.\-]+)", i.attributes).group(1)
                count, function = trip_count(i, enclosing)
                inner = cost_of(body, (*enclosing, function))
                inner.add(cost_of(condition, (*enclosing, function)))
                if count is None:
                    total.unknown_loops += 1
                total.add(inner, 1.0 if count is None else count)
            elif i.opcode == "conditional":
                branches = re.findall(r"(?:true_computation|false_computation)=%([\w.\-]+)", i.attributes)
                listed = re.search(r"branch_computations=\{([^}]*)\}", i.attributes)
                branches += re.findall(r"%([\w.\-]+)", listed.group(1)) if listed else []
                total.add(max((cost_of(b, enclosing) for b in branches), key=lambda c: c.seconds, default=Cost()))
            elif i.opcode == "call":
                total.add(cost_of(re.search(r"to_apply=%([\w.\-]+)", i.attributes).group(1), enclosing))
            elif i.opcode == "fusion":
                fused = re.search(r"calls=%([\w.\-]+)", i.attributes).group(1)
                total.add(kernel(dots(fused), fused_reads(i, fused) + fused_writes(i, fused), i))
            elif i.opcode == "custom-call":
                moved = sum(_shape_bytes(shapes.get(o, "")) for o in i.operands) + _shape_bytes(i.shape)
                name = re.search(r'name = "([^"]+)"', i.attributes) if "xla.gpu.triton" in i.attributes else None
                if name and triton:
                    grid = tuple(int(g) for g in re.search(
                        r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+)", i.attributes).groups())
                    total.add(kernel(*triton(name.group(1), [_dims(shapes[o]) for o in i.operands], grid), i))
                else:
                    total.add(kernel(0.0 if name else _gemm_flops(i, shapes), moved, i))
            else:  # a copy, a collective, or an op XLA runs as a kernel of its own
                total.add(kernel(0.0, sum(_shape_bytes(shapes.get(o, "")) for o in i.operands)
                                 + _shape_bytes(i.shape), i))
        return total

    return cost_of(entry)


def _loop_functions(hlo: str) -> dict[int, str]:
    """Stack frame id -> the function of its location, from the module's debug tables."""
    def table(title: str, pattern: str) -> dict[int, tuple[str, ...]]:
        section = re.search(rf"^{title}\n(.*?)(?:\n\n|\n[A-Z])", hlo, re.M | re.S)
        return {int(m[0]): m[1:] for m in re.findall(pattern, section.group(1), re.M)} if section else {}

    names = table("FunctionNames", r'^(\d+) "(.*)"$')
    locations = table("FileLocations", r"^(\d+) \{file_name_id=\d+ function_name_id=(\d+) ")
    frames = table("StackFrames", r"^(\d+) \{file_location_id=(\d+) ")
    return {frame: names.get(int(locations.get(int(location), ("0",))[0]), ("",))[0]
            for frame, (location,) in frames.items()}


def _dims(shape: str) -> list[int]:
    found = re.search(r"\[([\d,]*)\]", shape)
    return [int(d) for d in found.group(1).split(",") if d] if found else []


def _gemm_flops(instruction: _Instruction, shapes: dict[str, str]) -> float:
    """A library matmul's flops: 2 x output elements x the contracted size (cuBLAS calls carry their dimension
    numbers in the backend config)."""
    if "gemm" not in instruction.attributes and "matmul" not in instruction.attributes:
        return 0.0
    contracted = re.search(r'"lhs_contracting_dimensions":\["?([\d",]*)\]', instruction.attributes)
    if not contracted or not instruction.operands:
        return 0.0
    lhs = _dims(shapes.get(instruction.operands[0], ""))
    size = math.prod(lhs[int(d)] for d in re.findall(r"\d+", contracted.group(1)))
    return 2.0 * math.prod(_dims(instruction.shape)) * size
