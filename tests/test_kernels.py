"""The Pallas kernels in interpret mode against their XLA references — the MXFP4 grouped matmul, flash attention
with sinks (forward and backward), decode attention — and the model with kernels against the model without them
(logits, cached decoding, LoRA gradients on a packed base)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss_jax.config import ConfigError, GptOssConfig
from gptoss_jax.generation import Generator
from gptoss_jax.kernels import attention
from gptoss_jax.kernels.mxfp4_matmul import mxfp4_ragged_matmul, reference
from gptoss_jax.lora import LoraConfig, add_lora
from gptoss_jax.model import GptOss, LoRAParam
from gptoss_jax.mxfp4 import Mxfp4Weight
from gptoss_jax.ops import attention_with_sinks

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


def _random(rng, shape, dtype):
    return jnp.asarray(rng.normal(size=shape), dtype)


# T not a multiple of the block, windows shorter and longer than a block, GQA groups of 1, 2 and 4, packed segments
@pytest.mark.parametrize("batch, length, heads, kv_heads, head_dim, window, block", [
    (2, 40, 4, 2, 16, 8, 16),
    (1, 64, 4, 1, 32, None, 16),
    (2, 33, 2, 2, 16, 5, 16),
    (1, 50, 4, 2, 16, 20, 16),
    (1, 7, 2, 1, 16, None, 64),
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_flash_attention_matches_the_xla_reference(batch, length, heads, kv_heads, head_dim, window, block, dtype):
    rng = np.random.default_rng(length)
    q = _random(rng, (batch, length, heads, head_dim), dtype)
    k, v = (_random(rng, (batch, length, kv_heads, head_dim), dtype) for _ in range(2))
    sinks = _random(rng, (heads,), jnp.float32)
    segments = jnp.asarray(np.sort(rng.integers(0, 3, size=(batch, length)), axis=1), jnp.int32)
    out = attention.flash_attention(q, k, v, sinks, segments, window=window, block=block, interpret=True)
    expected = attention.reference(q, k, v, sinks, segments, window=window)
    assert out.dtype == expected.dtype and relative_error(out, expected) <= TOLERANCE[dtype]

    cotangent = _random(rng, expected.shape, jnp.float32)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2, 3))(q, k, v, sinks) for f in (
        lambda *a: attention.flash_attention(*a, segments, window=window, block=block, interpret=True),
        lambda *a: attention.reference(*a, segments, window=window))]
    for name, mine, theirs in zip(("q", "k", "v", "sinks"), *grads, strict=True):
        assert mine.dtype == theirs.dtype, name
        assert relative_error(mine, theirs) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("slots, block", [(50, 16), (128, 128), (5, 128)])
def test_decode_attention_matches_the_xla_reference(slots, block):
    rng = np.random.default_rng(slots)
    q = _random(rng, (3, 1, 4, 16), jnp.float32)
    k, v = (_random(rng, (3, slots, 2, 16), jnp.float32) for _ in range(2))
    sinks = _random(rng, (4,), jnp.float32)
    visible = jnp.asarray(rng.random(size=(3, slots)) < 0.6).at[2].set(False)  # row 2 sees no key: zeros
    out = attention.decode_attention(q, k, v, sinks, visible, block=block, interpret=True)
    expected = attention_with_sinks(q, k, v, sinks, visible[:, None, :])
    assert relative_error(out, expected) <= 1e-5 and not np.asarray(out[2]).any()


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


_EXPERT_PARALLEL = """
import jax.numpy as jnp, numpy as np
from flax import nnx
from gptoss_jax.config import GptOssConfig
from gptoss_jax.model import GptOss
from gptoss_jax.sharding import make_mesh, shard_model
tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, size=(2, 16)), jnp.int32)
logits = []
for kernels in ("xla", "pallas"):
    model = GptOss(GptOssConfig.tiny().replace(vocab_size=512, kernels=kernels), dtype="float32",
                   mxfp4_experts=True, rngs=nnx.Rngs(3))
    shard_model(model, make_mesh("expert=2,tensor=2"))
    logits.append(np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens)))
print(np.linalg.norm(logits[1] - logits[0]) / np.linalg.norm(logits[0]))
"""


def test_kernels_under_expert_parallelism():
    """Four CPU devices, experts over two and their intermediate over two: the kernel runs inside shard_map."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run([sys.executable, "-c", _EXPERT_PARALLEL], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) <= 1e-5


def test_kernels_setting_is_checked():
    with pytest.raises(ConfigError, match="GptOssConfig.kernels: expected one of"):
        GptOssConfig.tiny().replace(kernels="triton")
