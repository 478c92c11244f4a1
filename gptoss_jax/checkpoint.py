"""Loading gpt-oss checkpoints into the model, one tensor at a time.

A checkpoint layout is a table from each model parameter to the checkpoint tensor(s) it comes from: the
tensor's name, the shape the config implies for it, and how to turn it into the parameter's layout. The
loader walks the model's own parameter declarations, so nothing is loaded that the model does not declare and
every parameter must be found. Block parameters are stacked over layers: each layer's tensor is written into
its slot of the stacked array on the device (the old buffer donated), so host memory holds about one tensor.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.config import GptOssConfig
from gptoss_jax.model import GptOss
from gptoss_jax.tensor_files import CheckpointError, TensorFiles

log = logging.getLogger(__name__)

# (tensor name, shape expected in the file, conversion to the parameter's layout)
Source = tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def _as_is(tensor: np.ndarray) -> np.ndarray:
    return tensor


def hf_layout(config: GptOssConfig) -> tuple[dict[tuple, Source], Callable[[int], dict[tuple, Source]]]:
    """The transformers `GptOssForCausalLM` layout: (top-level sources, layer index -> block sources).

    torch Linear weights are [out, in]; the model keeps [in, ...out] so that it computes `x @ w`. The experts
    are already stored [in, out] by transformers.
    """
    d, n, k, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    e, f, v = config.num_experts, config.intermediate_size, config.vocab_size
    top = {
        ("embedding",): ("model.embed_tokens.weight", (v, d), _as_is),
        ("norm", "scale"): ("model.norm.weight", (d,), _as_is),
        ("unembedding",): ("lm_head.weight", (v, d), _as_is),
    }

    def block(layer: int) -> dict[tuple, Source]:
        prefix = f"model.layers.{layer}."
        table = {
            ("attn_norm", "scale"): ("input_layernorm.weight", (d,), _as_is),
            ("attn", "wq"): ("self_attn.q_proj.weight", (n * h, d), lambda t: t.T.reshape(d, n, h)),
            ("attn", "bq"): ("self_attn.q_proj.bias", (n * h,), lambda t: t.reshape(n, h)),
            ("attn", "wk"): ("self_attn.k_proj.weight", (k * h, d), lambda t: t.T.reshape(d, k, h)),
            ("attn", "bk"): ("self_attn.k_proj.bias", (k * h,), lambda t: t.reshape(k, h)),
            ("attn", "wv"): ("self_attn.v_proj.weight", (k * h, d), lambda t: t.T.reshape(d, k, h)),
            ("attn", "bv"): ("self_attn.v_proj.bias", (k * h,), lambda t: t.reshape(k, h)),
            ("attn", "wo"): ("self_attn.o_proj.weight", (d, n * h), lambda t: t.T.reshape(n, h, d)),
            ("attn", "bo"): ("self_attn.o_proj.bias", (d,), _as_is),
            ("attn", "sinks"): ("self_attn.sinks", (n,), _as_is),
            ("mlp_norm", "scale"): ("post_attention_layernorm.weight", (d,), _as_is),
            ("mlp", "router_w"): ("mlp.router.weight", (e, d), lambda t: t.T),
            ("mlp", "router_b"): ("mlp.router.bias", (e,), _as_is),
            ("mlp", "w_gate_up"): ("mlp.experts.gate_up_proj", (e, d, 2 * f), _as_is),
            ("mlp", "b_gate_up"): ("mlp.experts.gate_up_proj_bias", (e, 2 * f), _as_is),
            ("mlp", "w_down"): ("mlp.experts.down_proj", (e, f, d), _as_is),
            ("mlp", "b_down"): ("mlp.experts.down_proj_bias", (e, d), _as_is),
        }
        return {path: (prefix + name, shape, convert) for path, (name, shape, convert) in table.items()}

    return top, block


def load_model(path: str | Path, *, dtype="bfloat16") -> GptOss:
    """Loads a gpt-oss checkpoint directory in HF layout (config.json + safetensors, sharded or not)."""
    path = Path(path)
    config = GptOssConfig.from_pretrained(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: only the HF layout (config.json + *.safetensors) can be loaded so far")
    if "quantization_config" in json.loads((path / "config.json").read_text()):
        raise CheckpointError(f"{path / 'config.json'}: quantized (MXFP4) checkpoints cannot be loaded yet")
    files = TensorFiles(path)
    top, block = hf_layout(config)
    model = nnx.eval_shape(lambda: GptOss(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    used: set[str] = set()

    def load(param_path: tuple, variable: nnx.Variable) -> nnx.Variable:
        stack, *within = param_path
        if stack in ("banded_blocks", "full_blocks"):
            first_layer = 0 if stack == "banded_blocks" else 1
            sources = [block(first_layer + 2 * i)[tuple(within)] for i in range(variable.shape[0])]
            value = _stacked(variable, [functools.partial(_read, files, source, used) for source in sources])
        else:
            value = jnp.array(_read(files, top[param_path], used), variable.dtype)  # a copy, not a view of the file
        return variable.replace(value=value)

    state = nnx.from_flat_state([(p, load(p, v)) for p, v in nnx.to_flat_state(abstract)])
    unused = sorted(files.names() - used)
    if unused:
        raise CheckpointError(
            f"{files.file_of(unused[0])}: tensor '{unused[0]}' (and {len(unused) - 1} more) is not part of a "
            f"gpt-oss model with {config.num_hidden_layers} layers as {path / 'config.json'} describes"
        )
    log.info("loaded %d tensors from %s as %s", len(used), path, jnp.dtype(dtype).name)
    return nnx.merge(graphdef, state)


def _read(files: TensorFiles, source: Source, used: set[str]) -> np.ndarray:
    name, expected_shape, convert = source
    tensor = files.read(name)
    if tensor.shape != expected_shape:
        raise CheckpointError(
            f"{files.file_of(name)}: tensor '{name}' has shape {tensor.shape}, expected {expected_shape}"
        )
    used.add(name)
    return convert(tensor)


def _stacked(variable: nnx.Variable, read_layers: list[Callable[[], np.ndarray]]) -> jax.Array:
    stacked = jnp.zeros(variable.shape, variable.dtype)
    for index, read_layer in enumerate(read_layers):
        stacked = _write_layer(stacked, read_layer(), index)
    return stacked


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stacked: jax.Array, layer: jax.Array, index: int) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), index, axis=0)

