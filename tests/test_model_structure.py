"""Sizes and structure of the full presets, from shapes alone (nothing of the real size is allocated)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from gptoss_jax import GptOss, GptOssConfig, parameter_counts


@pytest.mark.parametrize(
    "preset, total, active",
    [(GptOssConfig.gpt_oss_20b, 20.91e9, 3.61e9), (GptOssConfig.gpt_oss_120b, 116.83e9, 5.13e9)],
)
def test_parameter_counts_of_the_released_models(preset, total, active):
    counted_total, counted_active = parameter_counts(preset())
    assert round(counted_total / 1e7) == round(total / 1e7)
    assert round(counted_active / 1e7) == round(active / 1e7)


def test_every_parameter_declares_its_logical_axes():
    model = nnx.eval_shape(lambda: GptOss(GptOssConfig.gpt_oss_20b(), rngs=nnx.Rngs(0)))
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert len(param.axes) == len(param.shape), path
        assert (param.axes[0] == "layers") == (path[0] in ("banded_blocks", "full_blocks")), path
    assert model.banded_blocks.mlp.w_gate_up.shape == (12, 32, 2880, 5760)
    assert model.full_blocks.attn.wk.axes == ("layers", "kv_heads", "head_dim", "embed")


def _forward_equations(num_layers: int) -> int:
    config = GptOssConfig.tiny().replace(num_hidden_layers=num_layers, vocab_size=64)
    model = nnx.eval_shape(lambda: GptOss(config, dtype="float32", rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.zeros((1, 8), jnp.int32))
    return len(jaxpr.eqns)


def test_forward_program_does_not_grow_with_depth():
    """Layers are scanned in (banded, full) pairs: a 36-layer program is the size of a 2-layer one."""
    assert _forward_equations(36) == _forward_equations(2)
    assert _forward_equations(25) == _forward_equations(3)
