"""A bad checkpoint directory names the file, the tensor, and what was expected."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import gptoss_jax
from gptoss_jax import CheckpointError, ConfigError
from hf_models import random_hf_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    random_hf_model(seed=1, num_hidden_layers=2).save_pretrained(directory)
    return directory


def _copy_with(tmp_path, checkpoint, edit):
    tensors = load_file(checkpoint / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    return tmp_path


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json: not found"):
        gptoss_jax.load_model(tmp_path)


def test_missing_weights(tmp_path, checkpoint):
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        gptoss_jax.load_model(tmp_path)


def test_missing_tensor_is_named(tmp_path, checkpoint):
    directory = _copy_with(tmp_path, checkpoint, lambda t: t.pop("model.layers.1.mlp.router.bias"))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\.mlp\.router\.bias' is missing"):
        gptoss_jax.load_model(directory)


def test_wrong_shape_names_file_tensor_and_both_shapes(tmp_path, checkpoint):
    def shrink(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:12]

    directory = _copy_with(tmp_path, checkpoint, shrink)
    with pytest.raises(CheckpointError) as error:
        gptoss_jax.load_model(directory)
    message = str(error.value)
    assert str(directory / "model.safetensors") in message
    assert "'model.layers.0.self_attn.k_proj.weight' has shape (12, 48), expected (24, 48)" in message


def test_extra_layer_is_reported(tmp_path, checkpoint):
    def add_layer(tensors):
        tensors["model.layers.2.self_attn.sinks"] = torch.ones(6)

    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.self_attn\.sinks' .* not part of .* 2 layers"):
        gptoss_jax.load_model(_copy_with(tmp_path, checkpoint, add_layer))


def test_index_pointing_at_a_missing_shard(tmp_path, checkpoint):
    random_hf_model(seed=1, num_hidden_layers=2).save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=rf"{shards[-1].name}: not found"):
        gptoss_jax.load_model(tmp_path)


def test_truncated_file(tmp_path, checkpoint):
    directory = _copy_with(tmp_path, checkpoint, lambda t: None)
    (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        gptoss_jax.load_model(directory)


def test_loaded_weights_do_not_alias_the_file(tmp_path, checkpoint):
    directory = _copy_with(tmp_path, checkpoint, lambda t: None)
    model = gptoss_jax.load_model(directory, dtype="float32")
    before = np.array(model.embedding[...])
    (directory / "model.safetensors").write_bytes(b"\0" * (directory / "model.safetensors").stat().st_size)
    np.testing.assert_array_equal(model.embedding[...], before)


def test_quantized_checkpoint_is_refused_clearly(tmp_path, checkpoint):
    directory = _copy_with(tmp_path, checkpoint, lambda t: None)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "mxfp4"}}))
    with pytest.raises(CheckpointError, match="MXFP4"):
        gptoss_jax.load_model(directory)
