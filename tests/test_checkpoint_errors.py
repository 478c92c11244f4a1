"""A bad checkpoint directory names the file, the tensor, and what was expected."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import gptoss_jax
from gptoss_jax import CheckpointError

from hf_models import random_hf_model
from layouts import model_with_mxfp4_experts, write_hf_mxfp4


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


def test_directory_without_a_config_is_an_unknown_layout(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"unknown layout: expected an HF checkpoint \(config\.json"):
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



def test_wrong_dtype_is_named(tmp_path, checkpoint):
    def to_int(tensors):
        tensors["model.layers.1.self_attn.o_proj.weight"] = tensors["model.layers.1.self_attn.o_proj.weight"].int()

    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.o_proj\.weight' has dtype int32, "
                                              r"expected a floating-point dtype"):
        gptoss_jax.load_model(_copy_with(tmp_path, checkpoint, to_int))


def test_mxfp4_scales_that_are_not_bytes(tmp_path):
    model, packed = model_with_mxfp4_experts(seed=2, num_hidden_layers=1)
    packed[0] = (packed[0][0], (packed[0][1][0], packed[0][1][1].float()))  # down_proj scales as float32
    write_hf_mxfp4(model, packed, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.experts\.down_proj_scales' has dtype "
                                              r"float32, expected uint8 \(MXFP4 blocks or scales\)"):
        gptoss_jax.load_model(tmp_path / "ckpt")


def test_config_that_contradicts_the_weights(tmp_path, checkpoint):
    directory = _copy_with(tmp_path, checkpoint, lambda t: None)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(CheckpointError) as error:
        gptoss_jax.load_model(directory)
    assert "'model.layers.0.self_attn.k_proj.bias' has shape (24,), expected (36,)" in str(error.value)
    assert str(directory / "config.json") in str(error.value)


def test_file_truncated_inside_its_data(tmp_path, checkpoint):
    directory = _copy_with(tmp_path, checkpoint, lambda t: None)
    file = directory / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*' ends at data byte \d+ but the file "
                                              r"holds only \d+ \(truncated\?\)"):
        gptoss_jax.load_model(directory)


def test_unknown_quantization_method(tmp_path, checkpoint):
    directory = _copy_with(tmp_path, checkpoint, lambda t: None)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(CheckpointError, match="only 'mxfp4' can be read"):
        gptoss_jax.load_model(directory)


def test_not_a_path_nor_a_repo_id():
    with pytest.raises(CheckpointError, match="no such directory, nor a hub repo id"):
        gptoss_jax.load_model("/no/such/checkpoint")


def test_bad_mxfp4_mode():
    with pytest.raises(ValueError, match="expected 'packed' or 'dequantize'"):
        gptoss_jax.load_model("/no/such/checkpoint", mxfp4="bf16")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_experts_are_refused_not_quantized(tmp_path, bad):
    """MXFP4 has no NaN or infinity: quantizing them wrote near-zeros or 0.75s without a word."""
    hf = random_hf_model(seed=3, num_hidden_layers=2, hidden_size=64, intermediate_size=32)
    with torch.no_grad():
        hf.model.layers[1].mlp.experts.down_proj[2, 5, 7] = bad
    hf.save_pretrained(tmp_path / "dense")
    message = r"^model\.layers\.1\.mlp\.experts\.down_proj: 1 NaN or infinite value\(s\); MXFP4 cannot represent"
    with pytest.raises(CheckpointError, match=message):
        gptoss_jax.convert(tmp_path / "dense", tmp_path / "converted", max_shard_size=20_000)
    model = gptoss_jax.load_model(tmp_path / "dense", dtype="float32")
    with pytest.raises(CheckpointError, match=message):
        gptoss_jax.save_pretrained(model, tmp_path / "saved", max_shard_size=20_000)
    for directory in (tmp_path / "converted", tmp_path / "saved"):  # the shards written before it are removed
        assert list(directory.iterdir()) == []
    gptoss_jax.save_pretrained(model, tmp_path / "unquantized", mxfp4=False)  # dense bf16/f32 can hold them
