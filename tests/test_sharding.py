"""Sharded inference: meshes of 8 CPU devices (and two jax.distributed processes) give one device's results —
logits, greedy tokens, and with adapters the logits and the adapters' gradients."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_jax.sharding import make_mesh

from helpers import relative_error
from layouts import model_with_mxfp4_experts, write_hf_mxfp4

HERE = Path(__file__).parent
MESHES = ["", "expert=4,tensor=2", "fsdp=8", "data=2,expert=4", "tensor=2,fsdp=4", "expert=2,tensor=2,fsdp=2"]
# QAT changes only the experts' weights: checked on one device and on the meshes that split experts over every axis
QAT_MESHES = ["", "expert=4,tensor=2", "expert=2,tensor=2,fsdp=2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An MXFP4 tiny model whose 8 experts and 4/2 heads split over the meshes above."""
    directory = tmp_path_factory.mktemp("sharded")
    model, packed = model_with_mxfp4_experts(seed=5, num_local_experts=8, num_experts_per_tok=2,
                                             intermediate_size=64)
    return write_hf_mxfp4(model, packed, directory / "ckpt")


def _run(args, env_extra):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, str(HERE / "sharded_check.py"), *args], env=env, capture_output=True,
                          text=True, timeout=600)


def _compare(results):
    reference = results[""]
    for spec, result in results.items():
        assert relative_error(result["logits"], reference["logits"]) <= 1e-5, spec
        for name in ("adapted", "adapted_grads") + (("qat", "qat_grads") if spec in QAT_MESHES else ()):
            assert relative_error(result[name], reference[name]) <= 1e-5, (spec, name)
        assert result["generated"] == reference["generated"], spec
    assert relative_error(reference["adapted"], reference["logits"]) > 1e-3  # the adapters matter
    assert relative_error(reference["qat"], reference["adapted"]) > 1e-4  # and so does quantizing their merge


def test_meshes_of_eight_devices_match_one_device(checkpoint, tmp_path):
    output = tmp_path / "results.json"
    checks = {spec: ["adapted", "qat"] if spec in QAT_MESHES else ["adapted"] for spec in MESHES}
    result = _run([str(checkpoint), json.dumps(checks), str(output)],
                  {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert result.returncode == 0, result.stderr[-4000:]
    _compare(json.loads(output.read_text()))


def test_two_processes_reproduce_one(checkpoint, tmp_path):
    """Two jax.distributed processes on 127.0.0.1 (gloo collectives), four devices each, one 8-device mesh."""
    single = tmp_path / "single.json"
    result = _run([str(checkpoint), json.dumps({"": [], "expert=4,tensor=2": []}), str(single)],
                  {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert result.returncode == 0, result.stderr[-4000:]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    distributed = tmp_path / "distributed.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    processes = [subprocess.Popen([sys.executable, str(HERE / "sharded_check.py"), str(checkpoint),
                                   json.dumps({"expert=4,tensor=2": []}), str(distributed), str(i), "2", str(port)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(2)]
    for process in processes:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-4000:]
    ours = json.loads(distributed.read_text())["expert=4,tensor=2"]
    reference = json.loads(single.read_text())[""]
    assert relative_error(ours["logits"], reference["logits"]) <= 1e-5
    assert ours["generated"] == reference["generated"]


def test_splits_that_cannot_work_are_clear_errors():
    """On real 8-device meshes: 6 experts over expert=4, and 2 key/value heads over tensor=4."""
    code = """
from flax import nnx
from gptoss_jax import GptOss, GptOssConfig
from gptoss_jax.sharding import make_mesh, shard_model
for spec, changes in (("expert=4,fsdp=2", dict(num_experts=6)), ("tensor=4,fsdp=2", dict(num_key_value_heads=2))):
    model = GptOss(GptOssConfig.tiny().replace(vocab_size=128, **changes), dtype="float32", rngs=nnx.Rngs(0))
    try:
        shard_model(model, make_mesh(spec))
    except ValueError as error:
        print(error)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    expected = ["6 experts cannot be split evenly over mesh axis expert of 4 devices",
                "2 key/value heads cannot be split evenly over mesh axis tensor of 4 devices"]
    assert result.stdout.strip().splitlines() == expected, result.stderr[-3000:]
    with pytest.raises(ValueError, match="needs 6 devices, there are 1"):
        make_mesh("expert=3,tensor=2")
    with pytest.raises(ValueError, match="unknown axis 'pipeline'"):
        make_mesh("pipeline=2")
    with pytest.raises(ValueError, match="expected AXIS=SIZE pairs"):
        make_mesh("expert:2")
