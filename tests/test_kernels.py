"""The Pallas MXFP4 grouped matmul in interpret mode against its XLA reference, and the model with the kernel
against the model without it (logits, cached decoding, LoRA gradients on a packed base)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss_jax.config import ConfigError, GptOssConfig
from gptoss_jax.generation import Generator
from gptoss_jax.kernels.mxfp4_matmul import mxfp4_ragged_matmul, reference
from gptoss_jax.lora import LoraConfig, add_lora
from gptoss_jax.model import GptOss, LoRAParam
from gptoss_jax.mxfp4 import Mxfp4Weight

from helpers import relative_error

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
SWIGLU = (1.702, 7.0)


def _problem(groups, k, n, sizes, extra_rows, dtype, seed=0):
    rng = np.random.default_rng(seed)
    weight = Mxfp4Weight.quantize(jnp.asarray(rng.normal(size=(groups, k, n)) * 0.2, jnp.float32))
    rows = jnp.asarray(rng.normal(size=(sum(sizes) + extra_rows, k)), dtype)
    bias = jnp.asarray(rng.normal(size=(groups, n)), dtype)
    return rows, weight, jnp.asarray(sizes, jnp.int32), bias


# groups of size zero, groups that do not fill a tile, rows past the last group, K and N over several tiles
@pytest.mark.parametrize("groups, k, n, sizes, extra_rows", [
    (4, 64, 64, [5, 0, 70, 20], 3),
    (3, 320, 192, [0, 1, 0], 0),
    (5, 96, 256, [64, 63, 0, 130, 2], 5),
    (2, 128, 96, [0, 0], 4),
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("swiglu", [None, SWIGLU], ids=["plain", "swiglu"])
def test_kernel_matches_the_xla_reference(groups, k, n, sizes, extra_rows, dtype, swiglu):
    rows, weight, group_sizes, bias = _problem(groups, k, n, sizes, extra_rows, dtype)
    out = mxfp4_ragged_matmul(rows, weight, group_sizes, bias, swiglu=swiglu, interpret=True)
    expected = reference(rows, weight, group_sizes, bias, swiglu=swiglu)
    assert out.shape == expected.shape and out.dtype == jnp.float32
    if expected.size and np.abs(np.asarray(expected)).max() > 0:
        assert relative_error(out, expected) <= TOLERANCE[dtype]
    assert not np.asarray(out[sum(sizes):]).any()  # rows past the groups are zeros

    def loss(function):
        # a random cotangent, so every output element's gradient counts
        cotangent = jnp.asarray(np.random.default_rng(1).normal(size=expected.shape), jnp.float32)
        return lambda r, b: jnp.sum(function(r, b) * cotangent)

    ours = jax.grad(loss(lambda r, b: mxfp4_ragged_matmul(r, weight, group_sizes, b, swiglu=swiglu, interpret=True)),
                    argnums=(0, 1))(rows, bias)
    theirs = jax.grad(loss(lambda r, b: reference(r, weight, group_sizes, b, swiglu=swiglu)),
                      argnums=(0, 1))(rows, bias)
    for mine, expected_grad in zip(ours, theirs, strict=True):
        assert mine.dtype == expected_grad.dtype
        if np.abs(np.asarray(expected_grad, np.float32)).max() > 0:
            assert relative_error(mine, expected_grad) <= TOLERANCE[dtype]
        else:
            assert not np.asarray(mine, np.float32).any()


def test_kernel_result_depends_on_the_weights():
    """A check that can fail: another expert's weights give another product."""
    rows, weight, group_sizes, bias = _problem(2, 64, 64, [10, 10], 0, jnp.float32)
    swapped = Mxfp4Weight(weight.blocks[::-1], weight.scales[::-1])
    out = mxfp4_ragged_matmul(rows, weight, group_sizes, bias, interpret=True)
    assert relative_error(mxfp4_ragged_matmul(rows, swapped, group_sizes, bias, interpret=True), out) > 0.1


def _models(**changes):
    config = GptOssConfig.tiny().replace(vocab_size=512, **changes)
    return [GptOss(config.replace(kernels=kernels), dtype="float32", mxfp4_experts=True, rngs=nnx.Rngs(3))
            for kernels in ("xla", "pallas")]


def test_model_logits_with_the_kernel_equal_the_xla_path():
    xla, pallas = _models()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, size=(2, 40)), jnp.int32)
    assert relative_error(pallas(tokens), xla(tokens)) <= 1e-5


def test_cached_decoding_with_the_kernel_gives_the_same_tokens():
    xla, pallas = _models()
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    assert Generator(pallas).generate(prompts, 6, stop_tokens=[]) == Generator(xla).generate(prompts, 6, stop_tokens=[])


def test_lora_gradients_through_the_packed_kernel():
    """LoRA on the experts (and attention) over a frozen MXFP4 base: the adapters' gradients match the XLA path."""
    models = _models()
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 512, size=(2, 24)), jnp.int32)
    grads = []
    for model in models:
        add_lora(model, LoraConfig(targets=("q_proj", "gate_up_proj", "down_proj")), rngs=nnx.Rngs(4))
        for path, variable in nnx.iter_graph(model):  # non-zero b, so every factor gets a gradient
            if isinstance(variable, LoRAParam) and path[-1] == "b":
                variable.set_value(jnp.full(variable.get_value().shape, 0.05, variable.get_value().dtype))
        graphdef, params, rest = nnx.split(model, LoRAParam, ...)

        def loss(params, graphdef=graphdef, rest=rest):
            return jnp.mean(nnx.merge(graphdef, params, rest)(tokens) ** 2)

        grads.append(jax.grad(loss)(params))
    leaves = [jax.tree.leaves(g) for g in grads]
    assert len(leaves[0]) == 3 * 2 * 2  # 3 targets x (a, b) x (banded, full) stacks
    for mine, expected in zip(leaves[1], leaves[0], strict=True):
        assert np.abs(np.asarray(expected)).max() > 0
        assert relative_error(mine, expected) <= 1e-5


def test_kernels_setting_is_checked():
    with pytest.raises(ConfigError, match="GptOssConfig.kernels: expected one of"):
        GptOssConfig.tiny().replace(kernels="triton")
