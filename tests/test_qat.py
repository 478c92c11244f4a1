"""Quantization-aware training (train.qat): the experts' forward is the MXFP4 export's, bit for bit, and the
gradient passes straight through it — to the float weights (full fine-tuning) and to the adapters (LoRA on a packed
base, trained through Q(W + delta)). The training runs and their exports are in test_train.py."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax
from gptoss_jax import GptOss, GptOssConfig, lora, save_pretrained
from gptoss_jax.model import LoRAParam
from gptoss_jax.mxfp4 import Mxfp4Weight, fake_quantize
from gptoss_jax.settings import ConfigError
from gptoss_jax.train.config import load_config
from gptoss_jax.train.run import EXPORT_LOSS_LIMIT, export_loss

from helpers import relative_error

DEMO = Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny_demo.py"

CONFIG = GptOssConfig.tiny().replace(vocab_size=512, num_hidden_layers=2)
TOKENS = np.random.default_rng(0).integers(0, 512, (2, 24)).astype(np.int32)
COTANGENT = np.random.default_rng(1).normal(size=(2, 24, 512)).astype(np.float32)


def _spread(model: GptOss) -> GptOss:
    """Expert weights over many binades (each block its own scale), one all-zero block: the scales vary."""
    rng = np.random.default_rng(2)
    for stack in (model.banded_blocks, model.full_blocks):
        for name in ("w_gate_up", "w_down"):
            value = np.asarray(getattr(stack.mlp, name)[...], np.float32)
            value = value * np.exp2(rng.integers(-12, 6, value.shape[:-2] + (1, value.shape[-1])))
            value[..., :32, 0] = 0.0
            getattr(stack.mlp, name)[...] = jnp.asarray(value, getattr(stack.mlp, name)[...].dtype)
    return model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fake_quantization_is_what_save_pretrained_writes_bit_for_bit(dtype, tmp_path):
    model = _spread(GptOss(CONFIG, dtype=dtype, rngs=nnx.Rngs(0)))
    save_pretrained(model, tmp_path / "export", mxfp4=True)
    written = gptoss_jax.load_model(tmp_path / "export", dtype=dtype, mxfp4="packed")
    for stack, read in ((model.banded_blocks, written.banded_blocks), (model.full_blocks, written.full_blocks)):
        for name in ("w_gate_up", "w_down"):
            packed = getattr(read.mlp, name).get_value()
            assert isinstance(packed, Mxfp4Weight)
            faked = fake_quantize(getattr(stack.mlp, name)[...])
            assert faked.dtype == jnp.dtype(dtype)
            expected = np.asarray(packed.dequantize(jnp.float32))
            assert np.any(expected != np.asarray(getattr(stack.mlp, name)[...], np.float32))  # it did round
            np.testing.assert_array_equal(np.asarray(faked, np.float32), expected, err_msg=name)


def _logits_objective(graphdef, frozen=None):
    def objective(params):
        model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
        return jnp.sum(model(TOKENS) * COTANGENT)

    return objective


def test_the_gradient_passes_straight_through_to_the_float_weights():
    """Full fine-tuning: the QAT model's gradient with respect to its float weights W is the plain model's
    gradient with respect to Q(W), its weights as exported; the loss is the plain model's on Q(W)."""
    qat = _spread(GptOss(CONFIG.replace(qat=True), dtype="float32", rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(qat, nnx.Param)
    plain = GptOss(CONFIG, dtype="float32", rngs=nnx.Rngs(1))
    nnx.update(plain, params)
    for stack in (plain.banded_blocks, plain.full_blocks):
        for name in ("w_gate_up", "w_down"):
            getattr(stack.mlp, name)[...] = fake_quantize(getattr(stack.mlp, name)[...])
    plain_graphdef, plain_params = nnx.split(plain, nnx.Param)
    loss, grads = jax.value_and_grad(_logits_objective(graphdef))(params)
    plain_loss, plain_grads = jax.value_and_grad(_logits_objective(plain_graphdef))(plain_params)
    assert abs(float(loss) - float(plain_loss)) <= 1e-6 * abs(float(plain_loss))
    ours, reference = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(plain_grads))
    assert ours.keys() == reference.keys()
    for path, grad in ours.items():
        expected = reference[path].get_value()
        assert np.abs(np.asarray(expected)).max() > 0, path
        assert relative_error(grad.get_value(), expected) <= 1e-6, path


def test_lora_on_a_packed_base_trains_through_the_quantized_merge():
    """LoRA on the experts of an MXFP4-packed base: the forward multiplies by Q(W + delta(a, b)), the weight the
    merged MXFP4 export holds, and the adapters' gradient is that of the plain model with respect to Q(W + delta),
    carried back through delta = scaling * a @ b."""
    qat = GptOss(CONFIG.replace(qat=True), dtype="float32", mxfp4_experts=True, rngs=nnx.Rngs(0))
    lora.add_lora(qat, lora.LoraConfig(rank=4, targets=("gate_up_proj", "down_proj")), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(3)
    for stack in (qat.banded_blocks, qat.full_blocks):
        for adapter in stack.mlp.adapters.values():  # b starts at zero: give the update a size
            adapter.b[...] = jnp.asarray(rng.normal(size=adapter.b[...].shape) * 0.05, jnp.float32)
    graphdef, adapters, frozen = nnx.split(qat, LoRAParam, ...)
    loss, grads = jax.value_and_grad(_logits_objective(graphdef, frozen))(adapters)

    merged = lora.merge_lora(qat)  # the export's weights before quantization (dense experts, no adapters)
    plain = GptOss(CONFIG, dtype="float32", rngs=nnx.Rngs(2))
    nnx.update(plain, nnx.state(merged, nnx.Param))
    for stack in (plain.banded_blocks, plain.full_blocks):
        for name in ("w_gate_up", "w_down"):
            getattr(stack.mlp, name)[...] = fake_quantize(getattr(stack.mlp, name)[...])
    plain_graphdef, plain_params = nnx.split(plain, nnx.Param)
    plain_loss, plain_grads = jax.value_and_grad(_logits_objective(plain_graphdef))(plain_params)
    assert abs(float(loss) - float(plain_loss)) <= 1e-6 * abs(float(plain_loss))

    for stack_name in ("banded_blocks", "full_blocks"):
        for name in ("w_gate_up", "w_down"):
            adapter = getattr(qat, stack_name).mlp.adapters[name]
            weight_grad = getattr(getattr(plain_grads, stack_name).mlp, name).get_value()

            def delta(a, b, adapter=adapter):
                return adapter.scaling * jnp.einsum("leir,lero->leio", a, b)

            _, back = jax.vjp(delta, adapter.a[...], adapter.b[...])
            expected_a, expected_b = back(weight_grad)
            ours = getattr(grads, stack_name).mlp.adapters[name]
            assert relative_error(ours.a.get_value(), expected_a) <= 1e-6, (stack_name, name)
            assert relative_error(ours.b.get_value(), expected_b) <= 1e-6, (stack_name, name)


def test_qat_needs_an_mxfp4_export():
    with pytest.raises(ConfigError, match=r"config.train.qat: .*export.mxfp4"):
        load_config(DEMO, ["--config.train.qat=true"])
    assert load_config(DEMO, ["--config.train.qat=true", "--config.export.mxfp4=true"]).train.qat


def test_an_export_that_lost_more_than_the_limit_says_so_without_qat():
    over, under = 1 + 2 * EXPORT_LOSS_LIMIT, 1 + EXPORT_LOSS_LIMIT / 2
    assert "train.qat = true" in export_loss("held-out loss", 2.0, 2.0 * over, qat=False)
    assert "train.qat" not in export_loss("held-out loss", 2.0, 2.0 * over, qat=True)  # reported, not blamed
    assert "train.qat" not in export_loss("held-out loss", 2.0, 2.0 * under, qat=False)
    assert "+2.00%" in export_loss("held-out loss", 2.0, 2.04, qat=False)
    lost_points = export_loss("accuracy", 0.5, 0.5 - 2 * EXPORT_LOSS_LIMIT, qat=False, higher_is_better=True)
    assert "-2.0 points" in lost_points and "train.qat = true" in lost_points
    assert "train.qat" not in export_loss("accuracy", 0.5, 0.6, qat=False, higher_is_better=True)


def test_remat_replays_the_quantized_experts_exactly():
    """With every layer recomputed in the backward pass (model.remat = "full"), QAT's gradients are the same."""
    model = _spread(GptOss(CONFIG.replace(qat=True), dtype="float32", rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)

    def grads(remat):
        def objective(params):
            hidden, _ = nnx.merge(graphdef, params).hidden_states(TOKENS, remat=remat)
            return jnp.sum(hidden * COTANGENT[..., :hidden.shape[-1]])

        return jax.tree.leaves(jax.grad(objective)(params))

    for replayed, kept in zip(grads("full"), grads("none"), strict=True):
        if np.any(np.asarray(kept)):  # the unembedding has no gradient here
            assert relative_error(replayed, kept) <= 1e-6
        else:
            assert not np.any(np.asarray(replayed))


def test_a_packed_base_without_expert_adapters_is_used_as_exported():
    """LoRA on attention only: the packed experts are exported as they are (merge_lora keeps them packed), so QAT's
    forward is the plain one, bit for bit — no dense copy of the experts is made for it."""
    outputs = []
    for qat in (False, True):
        model = GptOss(CONFIG.replace(qat=qat), dtype="float32", mxfp4_experts=True, rngs=nnx.Rngs(0))
        lora.add_lora(model, lora.LoraConfig(rank=4), rngs=nnx.Rngs(1))
        outputs.append(np.asarray(model(TOKENS)))
    np.testing.assert_array_equal(outputs[1], outputs[0])
