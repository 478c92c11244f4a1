"""The three layouts load to the same model; what we write, transformers loads; conversions keep the model."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import gptoss_jax
from gptoss_jax import GptOss, GptOssConfig, Mxfp4Weight
from gptoss_jax.checkpoint import HF, HF_MXFP4, ORIGINAL, open_checkpoint

from helpers import relative_error
from layouts import model_with_mxfp4_experts, write_hf_mxfp4, write_original

TOLERANCE = 1e-5  # float32 logits, relative error


@pytest.fixture(scope="module")
def three_layouts(tmp_path_factory):
    """(transformers model, tokens, its logits, {layout: directory}) for one model in all three layouts."""
    root = tmp_path_factory.mktemp("layouts")
    model, packed = model_with_mxfp4_experts(seed=4)
    model.save_pretrained(root / "hf")
    write_hf_mxfp4(model, packed, root / "hf_mxfp4")
    write_original(model, packed, root / "release")
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    directories = {HF: root / "hf", HF_MXFP4: root / "hf_mxfp4", ORIGINAL: root / "release"}
    return model, tokens.astype(np.int32), expected, directories


def _logits(model, tokens):
    return np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))


@pytest.mark.parametrize("layout", [HF, HF_MXFP4, ORIGINAL])
@pytest.mark.parametrize("mxfp4", ["packed", "dequantize"])
def test_every_layout_loads_to_the_transformers_logits(three_layouts, layout, mxfp4, caplog):
    _, tokens, expected, directories = three_layouts
    assert open_checkpoint(directories[layout]).layout == layout
    with caplog.at_level(logging.INFO, logger="gptoss_jax"):
        model = gptoss_jax.load_model(directories[layout], dtype="float32", mxfp4=mxfp4)
    experts = model.banded_blocks.mlp.w_gate_up.get_value()
    assert isinstance(experts, Mxfp4Weight) == (layout != HF and mxfp4 == "packed")
    if isinstance(experts, Mxfp4Weight):
        assert experts.blocks.dtype == np.uint8 and "kept packed (uint8)" in caplog.text
    elif layout != HF:
        assert "dequantized to float32 at load" in caplog.text
    else:
        assert "experts: unquantized" in caplog.text
    assert relative_error(_logits(model, tokens), expected) <= TOLERANCE


def test_original_folder_can_be_named_directly(three_layouts):
    _, tokens, expected, directories = three_layouts
    model = gptoss_jax.load_model(directories[ORIGINAL] / "original", dtype="float32")
    assert relative_error(_logits(model, tokens), expected) <= TOLERANCE


@pytest.mark.parametrize("source_layout", [HF, ORIGINAL])
def test_save_pretrained_mxfp4_loads_in_transformers(tmp_path, three_layouts, source_layout):
    _, tokens, _, directories = three_layouts
    ours = gptoss_jax.load_model(directories[source_layout], dtype="float32")
    gptoss_jax.save_pretrained(ours, tmp_path / "out", mxfp4=True, max_shard_size=60_000)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["quantization_config"]["quant_method"] == "mxfp4"
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()

    # On a CPU transformers reads MXFP4 checkpoints through its dequantizer.
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)
    ).eval()
    with torch.no_grad():
        expected = theirs(torch.tensor(tokens.astype(np.int64))).logits.numpy()
    assert relative_error(_logits(ours, tokens), expected) <= TOLERANCE
    again = gptoss_jax.load_model(tmp_path / "out", dtype="float32")
    assert relative_error(_logits(again, tokens), expected) <= TOLERANCE


def test_save_pretrained_unquantized_loads_in_transformers(tmp_path, three_layouts):
    _, tokens, expected, directories = three_layouts
    ours = gptoss_jax.load_model(directories[HF_MXFP4], dtype="float32")  # packed experts, written dense
    gptoss_jax.save_pretrained(ours, tmp_path / "out", mxfp4=False)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        reloaded = theirs(torch.tensor(tokens.astype(np.int64))).logits.numpy()
    assert relative_error(reloaded, expected) <= TOLERANCE


@pytest.mark.parametrize("source_layout, mxfp4", [(ORIGINAL, True), (ORIGINAL, False), (HF, True), (HF_MXFP4, False)])
def test_convert_keeps_the_model(tmp_path, three_layouts, source_layout, mxfp4):
    _, tokens, expected, directories = three_layouts
    gptoss_jax.convert(directories[source_layout], tmp_path / "out", mxfp4=mxfp4, dtype="float32")
    assert open_checkpoint(tmp_path / "out").layout == (HF_MXFP4 if mxfp4 else HF)
    model = gptoss_jax.load_model(tmp_path / "out", dtype="float32")
    assert relative_error(_logits(model, tokens), expected) <= TOLERANCE


def test_convert_command_shows_progress(tmp_path, three_layouts, capsys):
    from gptoss_jax.cli import main

    _, _, _, directories = three_layouts
    assert main(["convert", str(directories[ORIGINAL]), str(tmp_path / "out"), "--no-mxfp4"]) == 0
    assert "original -> HF" in capsys.readouterr().err
    assert open_checkpoint(tmp_path / "out").layout == HF


def test_writing_refuses_a_directory_that_holds_a_checkpoint(tmp_path, three_layouts):
    _, _, _, directories = three_layouts
    with pytest.raises(gptoss_jax.CheckpointError, match="already holds a checkpoint"):
        gptoss_jax.convert(directories[ORIGINAL], directories[HF])


@pytest.mark.parametrize(
    "preset, packed_gib, dense_gib",
    [(GptOssConfig.gpt_oss_20b, 12.8, 39), (GptOssConfig.gpt_oss_120b, 60.8, 218)],
)
def test_packed_model_bytes_match_the_released_checkpoints(preset, packed_gib, dense_gib):
    def parameter_gib(mxfp4_experts: bool) -> float:
        model = nnx.eval_shape(lambda: GptOss(preset(), mxfp4_experts=mxfp4_experts, rngs=nnx.Rngs(0)))
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(nnx.state(model))) / 2**30

    assert parameter_gib(True) == pytest.approx(packed_gib, rel=0.05)
    assert parameter_gib(False) == pytest.approx(dense_gib, rel=0.05)


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    """A fresh interpreter, for settings read once at import (device count, HF_HUB_OFFLINE, the hub cache)."""
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          cwd=Path(__file__).parent, timeout=300)


def test_mesh_places_every_parameter_in_its_sharding(three_layouts):
    _, tokens, expected, directories = three_layouts
    np.save(directories[HF_MXFP4].parent / "expected.npy", expected)
    result = _run_python(
        f"""
import jax, numpy as np
from flax import nnx
import gptoss_jax
from jax.sharding import PartitionSpec as P
from gptoss_jax.sharding import MESH_AXES
from helpers import relative_error

assert jax.device_count() == 8
explicit = jax.make_mesh((1, 2, 2, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Explicit,) * 4)
placed = gptoss_jax.load_model({str(directories[HF_MXFP4])!r}, dtype="float32", mesh=explicit)
# [layers, experts, 128 outputs, 3 groups of 32 inputs, 16]: 3 groups cannot split over tensor=2
spec = placed.banded_blocks.mlp.w_down.get_value().blocks.sharding.spec
assert spec == P(None, "expert", "fsdp", None, None), spec
mesh = jax.make_mesh((1, 2, 2, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
model = gptoss_jax.load_model({str(directories[HF_MXFP4])!r}, dtype="float32", mesh=mesh)
experts = model.banded_blocks.mlp.w_gate_up.get_value()  # [layers, experts, 192 outputs, 4 groups, 16]
assert experts.blocks.sharding.spec == P(None, "expert", "tensor", "fsdp", None), experts.blocks.sharding.spec
assert experts.scales.sharding.spec == P(None, "expert", "tensor", "fsdp"), experts.scales.sharding.spec
assert model.full_blocks.attn.wq[...].sharding.spec == P(None, "tensor", None, "fsdp")
assert model.embedding[...].sharding.spec == P("tensor", "fsdp")
assert len(model.embedding[...].sharding.device_set) == 8
logits = nnx.jit(lambda m, t: m(t))(model, np.array({tokens.tolist()}, np.int32))
error = relative_error(logits, np.load({str(directories[HF_MXFP4].parent / "expected.npy")!r}))
assert error <= {TOLERANCE}, error
print("ok")
""",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
    )
    assert result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def _fake_hub_cache(cache: Path, repo_id: str, checkpoint: Path) -> None:
    """The cache layout huggingface_hub keeps: refs/main names a snapshot folder holding the repo's files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(checkpoint, repo / "snapshots" / ("0" * 40))


def test_hub_id_loads_from_the_cache_while_offline(tmp_path, three_layouts):
    _, tokens, expected, directories = three_layouts
    _fake_hub_cache(tmp_path / "hub", "openai/gpt-oss-tiny", directories[ORIGINAL])
    np.save(tmp_path / "expected.npy", expected)
    result = _run_python(
        f"""
import numpy as np
import gptoss_jax
from helpers import relative_error
model = gptoss_jax.load_model("openai/gpt-oss-tiny", dtype="float32")
error = relative_error(model(np.array({tokens.tolist()}, np.int32)), np.load({str(tmp_path / "expected.npy")!r}))
assert error <= {TOLERANCE}, error
print("ok")
""",
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(tmp_path / "hub"),
    )
    assert result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_hub_id_while_offline_and_not_cached_is_a_clear_error(tmp_path):
    result = _run_python(
        """
import gptoss_jax
try:
    gptoss_jax.load_model("openai/gpt-oss-20b")
except gptoss_jax.CheckpointError as error:
    print(error)
""",
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(tmp_path / "empty"),
    )
    message = result.stdout.strip()
    assert message.startswith("openai/gpt-oss-20b: cannot get the model from the Hugging Face hub or its local "
                              "cache (HF_HUB_OFFLINE is set)"), result.stdout + result.stderr[-2000:]
