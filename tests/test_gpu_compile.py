"""Compiled for an H100 without one (gptoss_jax.gpu_compile: jax's CUDA plugin, deviceless): every Pallas kernel at
gpt-oss-20b and 120b shapes through Triton and ptxas for sm_90a with register spills as errors, a kernel too large
for the GPU refused, the model's prefill, decode step and LoRA train step with and without the kernels, `plan
--target`, and the roofline walker on programs whose cost is known by hand.

What this proves is that the programs compile for the GPU and fit it; numerics and speed need a GPU
(benchmarks/gpu_check.sh). Skipped without the gpu-compile extra (the test extra brings it)."""

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from gptoss_jax import GptOssConfig, gpu_compile

from helpers import whole_cache_copies

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

pytestmark = pytest.mark.skipif(not gpu_compile.cuda_plugin_installed(),
                                reason="needs jax's CUDA plugin and ptxas: pip install -e '.[gpu-compile]'")


@pytest.fixture(scope="module")
def h100():
    gpu = gpu_compile.target("h100")
    devices, present = gpu_compile.devices(gpu, 1)
    assert not present and devices[0].platform == "gpu" and "H100" in devices[0].device_kind
    return gpu, devices


@pytest.mark.parametrize("size", ["gpt_oss_20b", "gpt_oss_120b"])
def test_every_kernel_compiles_for_sm90a_at_the_released_shapes_without_spilling(h100, size, tmp_path):
    gpu, devices = h100
    config = getattr(GptOssConfig, size)()
    names = set()
    for index, check in enumerate(gpu_compile.kernel_checks(config)):
        dump = tmp_path / str(index)
        gpu_compile.compile_check(check, devices, spills_as_errors=True, dump_to=dump)
        kernels = gpu_compile.pallas_kernels(dump)
        assert kernels, check.label  # the kernels were compiled, not replaced by an interpreted loop
        assert all(k.registers > 0 and k.spill_bytes == 0 and 0 < k.shared_memory <= 232448 and min(k.grid) >= 1
                   for k in kernels), (check.label, kernels)
        triton = [text for text in (ptx.read_text() for ptx in dump.glob("*.ptx")) if "global_smem" in text]
        assert triton and all(".target sm_90a" in text for text in triton), check.label
        names |= {k.name for k in kernels}
    assert names == {"_mxfp4_matmul_kernel", "_mxfp4_transposed_kernel", "_flash_forward_kernel", "_flash_dq_kernel",
                     "_flash_dkv_kernel", "_decode_attention_kernel"}


@pytest.mark.parametrize(("block_m", "refusal"), [(1024, "Shared memory size limit exceeded"),
                                                  (256, "register spilling")])
def test_a_kernel_configuration_too_large_for_the_gpu_is_refused(h100, block_m, refusal):
    """The negative control: the MXFP4 matmul with row tiles of 1,024 needs 276 KiB of shared memory (an H100
    block has 227 KiB); with 256 it fits but spills registers, which spills-as-errors refuses."""
    gpu, devices = h100
    check = gpu_compile.kernel_checks(GptOssConfig.gpt_oss_20b(), swiglu_block_m=block_m)[0]
    with pytest.raises(Exception, match=refusal):
        gpu_compile.compile_check(check, devices, spills_as_errors=True)


def _pallas_calls(compiled) -> int:
    return len(re.findall(r'custom_call_target="__gpu\$xla\.gpu\.triton".*?name = "_\w+_kernel"', compiled.as_text()))


@pytest.mark.parametrize("kernels", ["auto", "xla"])
def test_prefill_and_decode_compile_for_an_h100_with_and_without_the_kernels(h100, kernels, tmp_path):
    """On the deviceless GPU, "auto" means the kernels (as on a real one) and "xla" none of them. (Spills are
    checked on the Pallas kernels only: XLA's own fusions may spill a few bytes, its choice.) The decode step
    copies no whole key/value stack (as it did when the cache kept positions before heads: two transposes of the
    full layers' cache a step)."""
    gpu, devices = h100
    for index, check in enumerate(gpu_compile.inference_checks(
            GptOssConfig.gpt_oss_20b().replace(kernels=kernels), prompt=1024, batch=8, cache=2048)):
        compiled = gpu_compile.compile_check(check, devices, dump_to=tmp_path / str(index))
        assert (_pallas_calls(compiled) > 0) == (kernels == "auto"), check.label
        assert all(k.spill_bytes == 0 for k in gpu_compile.pallas_kernels(tmp_path / str(index))), check.label
        assert 0 < compiled.memory_analysis().temp_size_in_bytes < gpu.memory, check.label
        if check.label.startswith("decode"):  # the step writes its one new position into the cache in place
            assert whole_cache_copies(compiled.as_text(), check.arguments[2]) == [], check.label


def _plan(target, *overrides):
    from gptoss_jax.train.config import load_config
    from gptoss_jax.train.plan import plan

    config = load_config(ROOT / "configs" / "train" / "gpt_oss_20b_lora.py",
                         ["--config.model.checkpoint=", "--config.model.preset=gpt_oss_20b",
                          "--config.optimizer.grad_accum=1", *overrides])
    return plan(config, target=target)


@pytest.mark.parametrize("kernels", ["auto", "xla"])
def test_a_20b_lora_train_step_compiles_for_an_h100_and_plan_reports_its_buffers(h100, kernels):
    """The trainer's own step (attention + expert adapters, AdamW, remat) through `plan --target h100`."""
    report = _plan("h100", "--config.data.seq_len=1024", f"--config.model.kernels={kernels}")
    assert report.platform == "gpu" and report.devices == 1 and "deviceless" in report.compiled_for
    assert 12.5 * GIB < report.frozen_bytes < 13 * GIB  # the MXFP4 base: 12.8 GiB
    assert 0 < report.temporary_bytes < 8 * GIB and report.cpu_copy_bytes == 0
    text = report.report()
    assert "NVIDIA H100 80GB HBM3 (deviceless)" in text and "float32 copies" not in text and "fits in 79.1" in text


def test_plan_compiles_on_as_many_gpus_as_the_mesh_asks_and_names_a_bad_target():
    from gptoss_jax.train.config import load_config
    from gptoss_jax.train.plan import plan

    config = ROOT / "configs" / "train" / "tiny_demo.py"
    one = plan(load_config(config, ["--config.mesh.fsdp=1", "--config.data.batch_size=2"]), target="h100")
    two = plan(load_config(config, ["--config.mesh.fsdp=2", "--config.data.batch_size=2"]), target="h100")
    assert (one.devices, two.devices) == (1, 2)
    assert two.trainable_bytes < 0.6 * one.trainable_bytes  # the parameters are split over the two GPUs
    with pytest.raises(gpu_compile.GpuCompileError, match=r"expected one of \['h100', 'h200'\] or a target config"):
        plan(load_config(config), target="h101")


def test_plan_target_from_the_command_line_runs_without_a_gpu():
    result = subprocess.run([sys.executable, "-m", "gptoss_jax.cli", "plan", "--config",
                             str(ROOT / "configs" / "train" / "tiny_demo.py"), "--target", "h200"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "compiled for NVIDIA H200 (deviceless)" in result.stdout and "fits in 140.4 GiB" in result.stdout


def test_the_roofline_walker_counts_what_a_program_does(h100):
    """Hand-checked programs: one matmul (2 n^3 flops, three n x n bf16 arrays moved), the same in a loop of
    known length (10x), and a loop of data-dependent length counted as `trips` says."""
    gpu, devices = h100
    n = 2048
    square = jax.ShapeDtypeStruct((n, n), jnp.bfloat16)

    def cost(function, *arguments, **options):
        compiled = gpu_compile.compile_for_gpu(jax.jit(function), *gpu_compile.on_devices(arguments, devices))
        return gpu_compile.program_cost(compiled.as_text(), gpu, **options)

    one = cost(lambda x, y: x @ y, square, square)
    assert one.flops == 2 * n**3 and one.bytes == 3 * n * n * 2 and one.kernels == 1
    assert one.seconds == pytest.approx(max(2 * n**3 / 989.4e12, 3 * n * n * 2 / gpu.bandwidth) + 2e-6)

    def looped(x, y):
        return jax.lax.fori_loop(0, 10, lambda i, c: (c @ y).astype(c.dtype), x)

    assert cost(looped, square, square).flops == 10 * 2 * n**3

    def data_dependent(x, y, count):
        return jax.lax.fori_loop(0, count, lambda i, c: (c @ y).astype(c.dtype), x)

    count = jax.ShapeDtypeStruct((), jnp.int32)
    unknown = cost(data_dependent, square, square, count)
    assert unknown.unknown_loops == 1 and unknown.flops == 2 * n**3
    assert cost(data_dependent, square, square, count, trips={data_dependent.__qualname__: (7,)}).flops == 7 * 2 * n**3
