"""gpt-oss checkpoints: reading the HF (unquantized or MXFP4) and original layouts, writing the HF layout.

A layout is a table from each model parameter to the checkpoint tensor(s) it is stored in (`Tensor`: name,
shape, and how the parameter is laid out in it); block parameters map to one entry per layer. MXFP4 experts map
to an `Mxfp4Weight` of two entries, blocks and scales. Loading walks the model's own parameter declarations, so
nothing is read that the model does not declare and every parameter must be found; writing walks the same
table the other way.

Tensors are read one at a time from memory-mapped files; block parameters are assembled on the device, each
layer written into its slot of the stacked array with the old buffer donated, so host memory holds about one
tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gptoss_jax import hub
from gptoss_jax import sharding as sharding_lib
from gptoss_jax.config import GptOssConfig
from gptoss_jax.model import GptOss
from gptoss_jax.mxfp4 import BLOCK_SIZE, Mxfp4Weight
from gptoss_jax.sharding import LogicalRules, param_shardings
from gptoss_jax.tensor_files import INDEX_FILE, CheckpointError, TensorFiles

log = logging.getLogger(__name__)

HF, HF_MXFP4, ORIGINAL = "HF", "HF-MXFP4", "original"

# Modules the released HF-MXFP4 checkpoints keep unquantized (everything but the experts).
_NOT_QUANTIZED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Where a parameter (or one layer of it) is stored: a checkpoint tensor and the parameter's place in it."""

    name: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None  # the parameter is this row range of a fused tensor
    packed: bool = False  # MXFP4 blocks or scales (uint8) rather than floating-point values

    def to_param(self, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.rows is not None:
            tensor = tensor[self.rows[0] : self.rows[1]]
        return tensor.reshape(shape)

    def from_param(self, value: np.ndarray) -> np.ndarray:
        assert self.rows is None, "fused tensors are only read"
        return value.reshape(self.shape)


Entry = Tensor | Mxfp4Weight  # an Mxfp4Weight of two Tensors: blocks and scales


# ---- layouts ---------------------------------------------------------------------------------------------------


def hf_layout(config: GptOssConfig, *, mxfp4: bool) -> dict[tuple, Entry | list[Entry]]:
    """transformers `GptOssForCausalLM` names; `mxfp4`: the experts as `*_blocks` / `*_scales` (released format)."""
    d, n, k, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    e, f, v = config.num_experts, config.intermediate_size, config.vocab_size

    def block(p: str) -> dict[tuple, Entry]:
        if mxfp4:
            gate_up = _mxfp4(p + "mlp.experts.gate_up_proj_{}", outputs=2 * f, inputs=d, experts=e)
            down = _mxfp4(p + "mlp.experts.down_proj_{}", outputs=d, inputs=f, experts=e)
        else:
            gate_up = Tensor(p + "mlp.experts.gate_up_proj", (e, d, 2 * f))
            down = Tensor(p + "mlp.experts.down_proj", (e, f, d))
        return {
            ("attn_norm", "scale"): Tensor(p + "input_layernorm.weight", (d,)),
            ("attn", "wq"): Tensor(p + "self_attn.q_proj.weight", (n * h, d)),
            ("attn", "bq"): Tensor(p + "self_attn.q_proj.bias", (n * h,)),
            ("attn", "wk"): Tensor(p + "self_attn.k_proj.weight", (k * h, d)),
            ("attn", "bk"): Tensor(p + "self_attn.k_proj.bias", (k * h,)),
            ("attn", "wv"): Tensor(p + "self_attn.v_proj.weight", (k * h, d)),
            ("attn", "bv"): Tensor(p + "self_attn.v_proj.bias", (k * h,)),
            ("attn", "wo"): Tensor(p + "self_attn.o_proj.weight", (d, n * h)),
            ("attn", "bo"): Tensor(p + "self_attn.o_proj.bias", (d,)),
            ("attn", "sinks"): Tensor(p + "self_attn.sinks", (n,)),
            ("mlp_norm", "scale"): Tensor(p + "post_attention_layernorm.weight", (d,)),
            ("mlp", "router_w"): Tensor(p + "mlp.router.weight", (e, d)),
            ("mlp", "router_b"): Tensor(p + "mlp.router.bias", (e,)),
            ("mlp", "w_gate_up"): gate_up,
            ("mlp", "b_gate_up"): Tensor(p + "mlp.experts.gate_up_proj_bias", (e, 2 * f)),
            ("mlp", "w_down"): down,
            ("mlp", "b_down"): Tensor(p + "mlp.experts.down_proj_bias", (e, d)),
        }

    top = {
        ("embedding",): Tensor("model.embed_tokens.weight", (v, d)),
        ("norm", "scale"): Tensor("model.norm.weight", (d,)),
        ("unembedding",): Tensor("lm_head.weight", (v, d)),
    }
    return _by_parameter(config, top, lambda layer: block(f"model.layers.{layer}."))


def original_layout(config: GptOssConfig) -> dict[tuple, Entry | list[Entry]]:
    """The `original/` checkpoint of openai/gpt-oss: fused qkv, MXFP4 experts (`*.blocks` / `*.scales`)."""
    d, n, k, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    e, f, v = config.num_experts, config.intermediate_size, config.vocab_size
    qkv = (n + 2 * k) * h
    q_rows, k_rows, v_rows = (0, n * h), (n * h, (n + k) * h), ((n + k) * h, qkv)

    def block(p: str) -> dict[tuple, Entry]:
        return {
            ("attn_norm", "scale"): Tensor(p + "attn.norm.scale", (d,)),
            ("attn", "wq"): Tensor(p + "attn.qkv.weight", (qkv, d), rows=q_rows),
            ("attn", "bq"): Tensor(p + "attn.qkv.bias", (qkv,), rows=q_rows),
            ("attn", "wk"): Tensor(p + "attn.qkv.weight", (qkv, d), rows=k_rows),
            ("attn", "bk"): Tensor(p + "attn.qkv.bias", (qkv,), rows=k_rows),
            ("attn", "wv"): Tensor(p + "attn.qkv.weight", (qkv, d), rows=v_rows),
            ("attn", "bv"): Tensor(p + "attn.qkv.bias", (qkv,), rows=v_rows),
            ("attn", "wo"): Tensor(p + "attn.out.weight", (d, n * h)),
            ("attn", "bo"): Tensor(p + "attn.out.bias", (d,)),
            ("attn", "sinks"): Tensor(p + "attn.sinks", (n,)),
            ("mlp_norm", "scale"): Tensor(p + "mlp.norm.scale", (d,)),
            ("mlp", "router_w"): Tensor(p + "mlp.gate.weight", (e, d)),
            ("mlp", "router_b"): Tensor(p + "mlp.gate.bias", (e,)),
            ("mlp", "w_gate_up"): _mxfp4(p + "mlp.mlp1_weight.{}", outputs=2 * f, inputs=d, experts=e),
            ("mlp", "b_gate_up"): Tensor(p + "mlp.mlp1_bias", (e, 2 * f)),
            ("mlp", "w_down"): _mxfp4(p + "mlp.mlp2_weight.{}", outputs=d, inputs=f, experts=e),
            ("mlp", "b_down"): Tensor(p + "mlp.mlp2_bias", (e, d)),
        }

    top = {
        ("embedding",): Tensor("embedding.weight", (v, d)),
        ("norm", "scale"): Tensor("norm.scale", (d,)),
        ("unembedding",): Tensor("unembedding.weight", (v, d)),
    }
    return _by_parameter(config, top, lambda layer: block(f"block.{layer}."))


def _mxfp4(name: str, *, outputs: int, inputs: int, experts: int) -> Mxfp4Weight:
    """The two tensors of an MXFP4 expert weight; `name` has a {} for "blocks" / "scales"."""
    groups = inputs // BLOCK_SIZE
    return Mxfp4Weight(
        Tensor(name.format("blocks"), (experts, outputs, groups, BLOCK_SIZE // 2), packed=True),
        Tensor(name.format("scales"), (experts, outputs, groups), packed=True),
    )


def _by_parameter(config: GptOssConfig, top: dict, block) -> dict[tuple, Entry | list[Entry]]:
    """Keys the table by the model's parameter paths: block parameters get their stack's per-layer entries."""
    table = dict(top)
    for stack, first_layer in (("banded_blocks", 0), ("full_blocks", 1)):
        layers = [block(layer) for layer in range(first_layer, config.num_hidden_layers, 2)]
        for within in block(0):
            table[(stack, *within)] = [entries[within] for entries in layers]
    return table


# ---- finding a checkpoint --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A located checkpoint: the directory holding its config.json and safetensors files, and its layout."""

    directory: Path
    layout: str
    config: GptOssConfig

    @property
    def experts_quantized(self) -> bool:
        return self.layout in (HF_MXFP4, ORIGINAL)

    def tensors(self) -> dict[tuple, Entry | list[Entry]]:
        if self.layout == ORIGINAL:
            return original_layout(self.config)
        return hf_layout(self.config, mxfp4=self.layout == HF_MXFP4)


def open_checkpoint(path_or_repo_id: str | os.PathLike, *, revision: str | None = None) -> Checkpoint:
    """Finds the checkpoint at a local path, or downloads (or finds in the HF cache) a hub repo's files."""
    path = Path(path_or_repo_id).expanduser()
    if not path.exists():
        if not hub.is_repo_id(str(path_or_repo_id)):
            raise CheckpointError(f"{path_or_repo_id}: no such directory, nor a hub repo id like 'openai/gpt-oss-20b'")
        path = _download(str(path_or_repo_id), revision)
    if (path / "config.json").is_file():
        config_file = path / "config.json"
    elif (path / "original" / "config.json").is_file():
        path, config_file = path / "original", path / "original" / "config.json"
    else:
        raise CheckpointError(
            f"{path}: unknown layout: expected an HF checkpoint (config.json + model*.safetensors) or the original "
            "one (original/config.json + original/model.safetensors)"
        )
    config = GptOssConfig.from_pretrained(config_file)
    data = json.loads(config_file.read_text())
    if "model_type" not in data:
        return Checkpoint(path, ORIGINAL, config)
    quantization = data.get("quantization_config")
    if quantization is None:
        return Checkpoint(path, HF, config)
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "mxfp4":
        raise CheckpointError(f"{config_file}: quantization_config {quantization!r}: only 'mxfp4' can be read")
    return Checkpoint(path, HF_MXFP4, config)


def _download(repo_id: str, revision: str | None) -> Path:
    """The HF-layout files (config + safetensors) if the repo has them, else its `original/` folder."""
    try:
        directory = hub.snapshot(repo_id, revision=revision, allow_patterns=_HF_FILES)
        if not any(directory.glob("model*.safetensors")):
            directory = hub.snapshot(repo_id, revision=revision, allow_patterns=["original/*"])
    except OSError as error:
        raise CheckpointError(str(error)) from None
    log.info("%s (revision %s) -> %s", repo_id, revision or "main", directory)
    return directory


_HF_FILES = ["config.json", "model*.safetensors", INDEX_FILE]


# ---- loading ---------------------------------------------------------------------------------------------------


def load_model(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype="bfloat16",
    mxfp4: str = "packed",
    mesh: Mesh | None = None,
    rules: LogicalRules | None = None,
    revision: str | None = None,
    kernels: str = "auto",
    moe_tile: int = 0,
    qat: bool = False,
) -> GptOss:
    """Loads a gpt-oss checkpoint: a local directory or a hub repo id, in the HF layout (unquantized or with
    MXFP4 experts, as released) or the original one (a directory holding, or named, `original/`).

    mxfp4: "packed" keeps MXFP4 experts packed (uint8) in device memory, dequantized at use; "dequantize"
        expands them to `dtype` at load. Unquantized checkpoints load unquantized either way.
    mesh: place every parameter straight into its sharding on this mesh (by `rules`, default DEFAULT_RULES).
    kernels: "auto" (the Pallas kernels on a GPU, XLA elsewhere), "xla" or "pallas" (see `GptOssConfig.kernels`).
    moe_tile: tokens the experts take at a time, 0 for all (see `GptOssConfig.moe_tile`).
    qat: the experts as an MXFP4 export holds them, for quantization-aware training (see `GptOssConfig.qat`).
    """
    if mxfp4 not in ("packed", "dequantize"):
        raise ValueError(f"mxfp4={mxfp4!r}: expected 'packed' or 'dequantize'")
    checkpoint = open_checkpoint(path_or_repo_id, revision=revision)
    packed = checkpoint.experts_quantized and mxfp4 == "packed"
    config, dtype = checkpoint.config.replace(kernels=kernels, moe_tile=moe_tile, qat=qat), jnp.dtype(dtype)
    model = nnx.eval_shape(lambda: GptOss(config, dtype=dtype, mxfp4_experts=packed, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    shardings = dict(nnx.to_flat_state(param_shardings(model, mesh, rules))) if mesh is not None else None
    table, reader = checkpoint.tensors(), _Reader(checkpoint)

    def load(path: tuple, variable: nnx.Variable) -> nnx.Variable:
        sharding = shardings[path].get_value() if shardings is not None else None
        entry, abstract_value = table[path], variable.get_value()
        if isinstance(entry, list):
            value = _stacked(reader, entry, abstract_value, sharding)
        else:
            value = _placed(reader.param(entry, abstract_value), abstract_value, sharding)
        return variable.replace(value=value)

    state = nnx.from_flat_state([(path, load(path, variable)) for path, variable in nnx.to_flat_state(abstract)])
    reader.check_all_used()
    experts = (
        "MXFP4, kept packed (uint8) in device memory" if packed
        else f"MXFP4, dequantized to {dtype.name} at load (mxfp4='dequantize')" if checkpoint.experts_quantized
        else f"unquantized, loaded as {dtype.name}"
    )
    log.info("loaded %s checkpoint %s (%d tensors); experts: %s", checkpoint.layout, checkpoint.directory,
             len(reader.used), experts)
    model = nnx.merge(graphdef, state)
    if mesh is not None:
        model.use_mesh(mesh, rules)
    return model


class _Reader:
    """Reads checkpoint tensors into parameter layout, checking shapes and dtypes, and records what it read."""

    def __init__(self, checkpoint: Checkpoint):
        self.files = TensorFiles(checkpoint.directory)
        self.config_file = checkpoint.directory / "config.json"
        self.num_layers = checkpoint.config.num_hidden_layers
        self.used: set[str] = set()

    def tensor(self, entry: Tensor) -> np.ndarray:
        tensor = self.files.read(entry.name)
        where = f"{self.files.file_of(entry.name)}: tensor '{entry.name}'"
        if tensor.shape != entry.shape:
            raise CheckpointError(
                f"{where} has shape {tensor.shape}, expected {entry.shape} for the model {self.config_file} describes"
            )
        if entry.packed != (tensor.dtype == np.uint8) or not (entry.packed or _is_float(tensor.dtype)):
            expected = "uint8 (MXFP4 blocks or scales)" if entry.packed else "a floating-point dtype"
            raise CheckpointError(f"{where} has dtype {tensor.dtype}, expected {expected}")
        self.used.add(entry.name)
        return tensor

    def param(self, entry: Entry, abstract):
        """One parameter value (one layer of it, for block parameters) shaped like `abstract`."""
        if isinstance(entry, Mxfp4Weight):
            weight = Mxfp4Weight(self.tensor(entry.blocks), self.tensor(entry.scales))
            return weight if isinstance(abstract, Mxfp4Weight) else weight.dequantize(abstract.dtype)
        return entry.to_param(self.tensor(entry), abstract.shape)

    def check_all_used(self) -> None:
        """A tensor nothing read means the checkpoint holds more than the config describes: refuse, not drop."""
        unused = sorted(self.files.names() - self.used)
        if unused:
            raise CheckpointError(
                f"{self.files.file_of(unused[0])}: tensor '{unused[0]}' (and {len(unused) - 1} more) is not part of "
                f"a gpt-oss model with {self.num_layers} layers as {self.config_file} describes"
            )


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def _stacked(reader: _Reader, entries: list[Entry], abstract, sharding):
    """Assembles a block parameter [layers, ...] layer by layer on the device(s)."""
    layer_abstract = _one_layer(abstract)
    leaf_shardings = sharding if sharding is not None else jax.tree.map(lambda _: None, abstract)
    stacked = jax.tree.map(lambda a, s: sharding_lib.zeros(a.shape, a.dtype, s), abstract, leaf_shardings)
    for index, entry in enumerate(entries):
        layer = reader.param(entry, layer_abstract)
        stacked = jax.tree.map(functools.partial(_write_layer, index=index), stacked, layer, leaf_shardings)
    return stacked


def _write_layer(stacked: jax.Array, layer, sharding: NamedSharding | None, *, index: int) -> jax.Array:
    return _layer_writer(sharding)(stacked, sharding_lib.put(layer, sharding_lib.layer_sharding(sharding)), index)


def _one_layer(abstract):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), abstract)


@functools.cache
def _layer_writer(sharding):
    def write(stacked, layer, index):
        return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), index, axis=0)

    return jax.jit(write, donate_argnums=0, out_shardings=sharding)


def _placed(value, abstract, sharding):
    """A whole parameter on its device(s), in its dtype; copied off the memory map, never a view of the file."""
    leaf_shardings = sharding if sharding is not None else jax.tree.map(lambda _: None, abstract)
    return jax.tree.map(lambda v, a, s: sharding_lib.put(v, s, a.dtype), value, abstract, leaf_shardings)


# ---- writing ---------------------------------------------------------------------------------------------------

DEFAULT_SHARD_SIZE = 5 * 2**30  # bytes, as transformers' save_pretrained


def save_pretrained(
    model: GptOss, directory: str | os.PathLike, *, mxfp4: bool = True, max_shard_size: int = DEFAULT_SHARD_SIZE
) -> Path:
    """Writes `model` in the HF layout that transformers loads: config.json, safetensors shards of at most
    `max_shard_size` bytes, and their index when there are several. `mxfp4`: experts as MXFP4 blocks and scales
    with a `quantization_config`, as released (dense experts are quantized here); otherwise dense, in the model
    dtype. Other parameters keep their dtype."""
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    values = (
        (path, layer, jax.tree.map(functools.partial(_on_host, layer=layer), params[path].get_value()))
        for path, layer in _parameter_layers(model.config)
    )
    return _write_hf(values, model.config, Path(directory), mxfp4=mxfp4, dtype=model.dtype,
                     max_shard_size=max_shard_size)


def _on_host(array: jax.Array, *, layer: int | None) -> np.ndarray:
    return np.asarray(array if layer is None else array[layer])


def convert(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    mxfp4: bool = True,
    dtype="bfloat16",
    revision: str | None = None,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = False,
) -> Path:
    """Rewrites a checkpoint (any layout `load_model` reads) in the HF layout, one tensor at a time: only the
    tensor in hand and the shard being filled are in memory. Tensors keep their dtype; experts that change from
    MXFP4 to dense become `dtype`."""
    checkpoint = open_checkpoint(source, revision=revision)
    config = checkpoint.config
    model = nnx.eval_shape(
        lambda: GptOss(config, dtype=dtype, mxfp4_experts=checkpoint.experts_quantized, rngs=nnx.Rngs(0))
    )
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    table, reader = checkpoint.tensors(), _Reader(checkpoint)
    items = _parameter_layers(config)
    if progress:
        from tqdm.auto import tqdm

        target = "HF-MXFP4" if mxfp4 else "HF"
        items = tqdm(items, desc=f"{checkpoint.layout} -> {target}", unit="tensor")

    def values() -> Iterator[tuple[tuple, int | None, object]]:
        for path, layer in items:
            abstract = params[path].get_value()
            if layer is None:
                yield path, layer, reader.param(table[path], abstract)
            else:
                yield path, layer, reader.param(table[path][layer], _one_layer(abstract))
        reader.check_all_used()

    return _write_hf(values(), config, Path(destination), mxfp4=mxfp4, dtype=jnp.dtype(dtype),
                     max_shard_size=max_shard_size)


def _parameter_layers(config: GptOssConfig) -> list[tuple[tuple, int | None]]:
    """(parameter path, layer index within its stack, or None) for every tensor-sized piece of the model."""
    return [
        (path, layer)
        for path, entry in hf_layout(config, mxfp4=False).items()
        for layer in (range(len(entry)) if isinstance(entry, list) else [None])
    ]


def _write_hf(values, config: GptOssConfig, directory: Path, *, mxfp4: bool, dtype, max_shard_size: int) -> Path:
    existing = sorted(p.name for p in [directory / "config.json", *directory.glob("model*.safetensors")] if p.exists())
    if existing:
        raise CheckpointError(f"{directory}: already holds a checkpoint ({existing[0]}); write to a new directory")
    table = hf_layout(config, mxfp4=mxfp4)
    shards = _ShardWriter(directory, max_shard_size)
    try:
        for path, layer, value in values:
            entry = table[path] if layer is None else table[path][layer]
            if isinstance(entry, Mxfp4Weight):
                weight = value if isinstance(value, Mxfp4Weight) else Mxfp4Weight.quantize(_finite(value, entry))
                shards.add(entry.blocks.name, np.asarray(weight.blocks))
                shards.add(entry.scales.name, np.asarray(weight.scales))
            else:
                dense = value.dequantize(dtype) if isinstance(value, Mxfp4Weight) else value
                shards.add(entry.name, entry.from_param(np.asarray(dense)))
    except BaseException:
        shards.discard()
        raise
    shards.finish()
    hf_config = config.to_hf_dict() | {"dtype": jnp.dtype(dtype).name}
    if mxfp4:
        hf_config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": _NOT_QUANTIZED}
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    log.info("wrote %s checkpoint to %s", HF_MXFP4 if mxfp4 else HF, directory)
    return directory


def _finite(value, entry: Mxfp4Weight) -> np.ndarray:
    """The dense expert weight about to become MXFP4, refused if it holds a NaN or an infinity: the format has
    neither (they would be written as garbage blocks)."""
    value = np.asarray(value)
    bad = value.size - int(np.isfinite(value).sum())
    if bad:
        name = entry.blocks.name.removesuffix("_blocks")
        raise CheckpointError(f"{name}: {bad} NaN or infinite value(s); MXFP4 cannot represent them, nothing written")
    return value


class _ShardWriter:
    """Fills safetensors shards up to a byte budget, then names them as transformers does and writes the index."""

    def __init__(self, directory: Path, max_bytes: int):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, np.ndarray] = {}
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if self.pending and sum(a.nbytes for a in self.pending.values()) + array.nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = np.ascontiguousarray(array)
        self.total_bytes += array.nbytes

    def _flush(self) -> None:
        file = self.directory / f".partial-{len(self.shards)}.safetensors"
        safetensors.numpy.save_file(self.pending, file, metadata={"format": "pt"})
        self.shards.append((file, list(self.pending)))
        self.pending = {}

    def discard(self) -> None:
        """Removes the shards written so far (a failed write leaves no partial checkpoint)."""
        for file, _ in self.shards:
            file.unlink(missing_ok=True)

    def finish(self) -> None:
        self._flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.directory / "model.safetensors")
            return
        weight_map = {}
        for number, (file, names) in enumerate(self.shards, start=1):
            final = f"model-{number:05d}-of-{len(self.shards):05d}.safetensors"
            file.rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
