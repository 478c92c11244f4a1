"""LoRA for gpt-oss: attaching adapters, merging them, and PEFT's adapter format.

Targets use transformers' names: `q_proj`, `k_proj`, `v_proj`, `o_proj` (PEFT `target_modules`) and `router`,
`gate_up_proj`, `down_proj` (PEFT `target_parameters`: one adapter per expert for the last two). Adapters are
`LoRAParam`s stored beside the base weights (`Attention.adapters`, `MoE.adapters`), so the base tree is
unchanged: `nnx.state(model, LoRAParam)` is the adapter alone, and a pretrained checkpoint loads as it is.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from gptoss_jax.model import GptOss, LoRA, LoRAParam
from gptoss_jax.mxfp4 import Mxfp4Weight
from gptoss_jax.tensor_files import CheckpointError, TensorFiles

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Target:
    module: str  # "attn" or "mlp"
    weight: str  # the base parameter's name in that module
    experts: bool  # one adapter per expert (leading axis E)
    inputs: int  # how many of the weight's axes (after the expert axis) are inputs
    outputs_first: bool  # the weight lays its outputs before its inputs (a torch Linear's [out, in])
    peft_path: str  # the module's path in transformers, under model.layers.N


TARGETS = {
    "q_proj": _Target("attn", "wq", False, 1, True, "self_attn.q_proj"),
    "k_proj": _Target("attn", "wk", False, 1, True, "self_attn.k_proj"),
    "v_proj": _Target("attn", "wv", False, 1, True, "self_attn.v_proj"),
    "o_proj": _Target("attn", "wo", False, 2, True, "self_attn.o_proj"),
    "router": _Target("mlp", "router_w", False, 1, True, "mlp.router"),
    "gate_up_proj": _Target("mlp", "w_gate_up", True, 1, False, "mlp.experts"),
    "down_proj": _Target("mlp", "w_down", True, 1, False, "mlp.experts"),
}
_PARAMETER_TARGETS = ("router", "gate_up_proj", "down_proj")  # PEFT target_parameters, in nesting order
_PEFT_PREFIX = "base_model.model.model.layers."


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0  # updates are scaled by alpha / rank
    dropout: float = 0.0  # on the adapter input; attention targets only (as PEFT allows)
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # fnmatch patterns over TARGETS

    def names(self) -> list[str]:
        """The targeted weights, validating the patterns and the dropout."""
        if self.rank < 1:
            raise ValueError(f"lora.rank: must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        names = []
        for pattern in self.targets:
            matched = fnmatch.filter(TARGETS, pattern)
            if not matched:
                raise ValueError(f"lora.targets: {pattern!r} matches none of {sorted(TARGETS)}")
            names += [name for name in matched if name not in names]
        if self.dropout and any(name in _PARAMETER_TARGETS for name in names):
            raise ValueError("lora.dropout: must be 0 when the router or experts are targeted (an update of a weight "
                             "cannot drop inputs per token; PEFT refuses the same)")
        return [name for name in TARGETS if name in names]


def add_lora(model: GptOss, config: LoraConfig, *, rngs: nnx.Rngs, dtype=jnp.float32) -> GptOss:
    """Attaches adapters (`a` uniform in ±1/sqrt(fan-in), `b` zero, as PEFT initialises them) to every layer."""
    for name in config.names():
        target = TARGETS[name]
        for stack in (model.banded_blocks, model.full_blocks):
            module = getattr(stack, target.module)
            module.adapters[target.weight] = _new_adapter(getattr(module, target.weight), target, config, rngs, dtype)
    return model


def _new_adapter(weight: nnx.Param, target: _Target, config: LoraConfig, rngs: nnx.Rngs, dtype) -> LoRA:
    layers, *shape = weight.get_value().shape
    _, *axes = weight.axes
    lead = 1 if target.experts else 0
    inputs, outputs = slice(lead, lead + target.inputs), slice(lead + target.inputs, None)
    if target.outputs_first:
        outputs, inputs = slice(lead, len(shape) - target.inputs), slice(len(shape) - target.inputs, None)
    fan_in = math.prod(shape[inputs])
    a_shape = (layers, *shape[:lead], *shape[inputs], config.rank)
    a_axes = ("layers", *axes[:lead], *axes[inputs], "lora_rank")
    b_shape = (layers, *shape[:lead], config.rank, *shape[outputs])
    b_axes = ("layers", *axes[:lead], "lora_rank", *axes[outputs])
    bound = 1 / math.sqrt(fan_in)
    a = jax.random.uniform(rngs.params(), a_shape, dtype, -bound, bound)
    return LoRA(LoRAParam(a, axes=a_axes), LoRAParam(jnp.zeros(b_shape, dtype), axes=b_axes),
                inputs=target.inputs, scaling=config.alpha / config.rank, dropout=config.dropout,
                outputs_first=target.outputs_first)


def merge_lora(model: GptOss) -> GptOss:
    """A model without adapters whose weights include their updates. MXFP4 experts become dense (in the model
    dtype) when any expert weight is adapted; `save_pretrained(..., mxfp4=True)` quantizes them again."""
    adapted = {}
    for stack_name in ("banded_blocks", "full_blocks"):
        for module_name in ("attn", "mlp"):
            for weight, adapter in getattr(getattr(model, stack_name), module_name).adapters.items():
                adapted[(stack_name, module_name, weight)] = adapter
    packed = isinstance(model.banded_blocks.mlp.w_gate_up.get_value(), Mxfp4Weight) and not any(
        path[-1] in ("w_gate_up", "w_down") for path in adapted)
    merged = nnx.eval_shape(lambda: GptOss(model.config, dtype=model.dtype, mxfp4_experts=packed, rngs=nnx.Rngs(0)))
    values = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))

    def merged_value(path: tuple, variable: nnx.Variable) -> nnx.Variable:
        value = values[path].get_value()
        if isinstance(value, Mxfp4Weight) and not isinstance(variable.get_value(), Mxfp4Weight):
            value = value.dequantize(jnp.float32)
        if path in adapted:
            value = (value.astype(jnp.float32) + adapted[path].delta().reshape(value.shape)).astype(model.dtype)
        return variable.replace(value=value)

    nnx.update(merged, nnx.from_flat_state([(p, merged_value(p, v)) for p, v in nnx.to_flat_state(nnx.state(merged))]))
    return merged


# ---- PEFT adapter directories ----------------------------------------------------------------------------------


def save_peft_adapter(model: GptOss, directory: str | os.PathLike, *,
                      base_model_name_or_path: str | None = None) -> Path:
    """Writes `adapter_config.json` + `adapter_model.safetensors` for `peft.PeftModel.from_pretrained` on
    transformers' GptOssForCausalLM."""
    directory = Path(directory)
    adapters = _adapters(model)
    if not adapters:
        raise ValueError("the model has no LoRA adapters to save")
    names = [name for name in TARGETS if any(n == name for n, _ in adapters)]
    first = next(adapter for _, adapter in adapters.values())
    rank = first.a.get_value().shape[-1]
    tensors = {}
    for (name, layer), (index, adapter) in adapters.items():
        a, b = _peft_factors(name, np.asarray(adapter.a[...][index], np.float32),
                             np.asarray(adapter.b[...][index], np.float32))
        key = _peft_key(name, layer, names)
        # safetensors writes the raw buffer: transposed views must be made contiguous first
        tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b)
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": _number(first.scaling * rank),
        "lora_dropout": first.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": [n for n in names if n not in _PARAMETER_TARGETS] or None,
        "target_parameters": [_parameter_name(n) for n in _PARAMETER_TARGETS if n in names] or None,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_peft_adapter(model: GptOss, directory: str | os.PathLike) -> GptOss:
    """Attaches the LoRA adapter of a PEFT adapter directory (one written by PEFT or by `save_peft_adapter`)."""
    directory = Path(directory)
    config_file = directory / "adapter_config.json"
    try:
        peft = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_file}: {error}") from None
    if peft.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_file}: peft_type={peft.get('peft_type')!r}; only LoRA adapters can be loaded")
    for field, plain in _PEFT_PLAIN.items():
        value = peft.get(field, plain)
        if value != plain and (value or plain):  # None, [], {} and False all mean "not used"
            raise CheckpointError(f"{config_file}: {field}={value!r} is not supported (plain LoRA has "
                                  f"{field}={plain!r}); loading it without would give other outputs")
    if not isinstance(peft.get("target_modules") or [], list):
        raise CheckpointError(f"{config_file}: target_modules must be a list of names (not a regex)")
    modules = [m.split(".")[-1] for m in peft.get("target_modules") or []]
    parameters = {_parameter_name(n): n for n in _PARAMETER_TARGETS}
    unknown = [p for p in peft.get("target_parameters") or [] if p not in parameters]
    if unknown or any(m not in TARGETS or m in _PARAMETER_TARGETS for m in modules):
        raise CheckpointError(f"{config_file}: targets {modules + unknown} are not gpt-oss LoRA targets "
                              f"{sorted(TARGETS)}")
    names = modules + [parameters[p] for p in peft.get("target_parameters") or []]
    # rank-stabilised LoRA scales by alpha / sqrt(r) where LoRA scales by alpha / r
    alpha = peft["lora_alpha"] * math.sqrt(peft["r"]) if peft.get("use_rslora") else peft["lora_alpha"]
    lora = LoraConfig(rank=peft["r"], alpha=alpha, dropout=peft.get("lora_dropout") or 0.0, targets=tuple(names))
    add_lora(model, lora, rngs=nnx.Rngs(0))
    files = TensorFiles(directory)
    ordered = [name for name in TARGETS if name in names]
    read = set()
    for (name, layer), (stack_index, adapter) in _adapters(model).items():
        key = _peft_key(name, layer, ordered)
        read |= {f"{key}.lora_A.weight", f"{key}.lora_B.weight"}
        a, b = (np.asarray(files.read(f"{key}.lora_{ab}.weight")) for ab in "AB")
        a, b = _our_factors(name, a, b, adapter.a.get_value().shape[1:], adapter.b.get_value().shape[1:])
        adapter.a[...] = adapter.a[...].at[stack_index].set(a)
        adapter.b[...] = adapter.b[...].at[stack_index].set(b)
    unread = sorted(files.names() - read)
    if unread:
        raise CheckpointError(f"{files.file_of(unread[0])}: tensor '{unread[0]}' (and {len(unread) - 1} more) is not "
                              f"a LoRA factor of the targets {names}; refusing to drop it")
    log.info("loaded LoRA adapter %s: rank %d, alpha %g, on %s", directory, lora.rank, lora.alpha, ", ".join(names))
    return model


# adapter_config.json fields that make an adapter more than LoRA on whole target weights, with the value under which
# they change nothing (PEFT's default). Any other value changes the outputs: refused, not ignored.
_PEFT_PLAIN = {
    "bias": "none",  # trained biases
    "modules_to_save": None,  # whole modules trained and saved beside the adapter
    "rank_pattern": {}, "alpha_pattern": {},  # per-module ranks and alphas
    "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,  # adapters on a subset
    "fan_in_fan_out": False, "use_dora": False, "lora_bias": False, "use_qalora": False, "use_bdlora": None,
    "trainable_token_indices": None, "alora_invocation_tokens": None, "layer_replication": None,
    "arrow_config": None, "kasa_config": None,
}


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _adapters(model: GptOss) -> dict[tuple[str, int], tuple[int, LoRA]]:
    """(target name, layer number) -> (index in its stack, the stacked adapter)."""
    found = {}
    for name, target in TARGETS.items():
        for first_layer, stack in ((0, model.banded_blocks), (1, model.full_blocks)):
            adapter = getattr(stack, target.module).adapters.get(target.weight)
            if adapter is not None:
                for index in range(adapter.a.get_value().shape[0]):
                    found[(name, first_layer + 2 * index)] = (index, adapter)
    return dict(sorted(found.items(), key=lambda item: (item[0][1], list(TARGETS).index(item[0][0]))))


def _parameter_name(name: str) -> str:
    return {"router": "mlp.router.weight", "gate_up_proj": "mlp.experts.gate_up_proj",
            "down_proj": "mlp.experts.down_proj"}[name]


def _peft_key(name: str, layer: int, names: list[str]) -> str:
    """PEFT nests the wrappers of several parameters of one module in `target_parameters` order: the first
    listed is innermost, one `base_layer.` deeper per parameter listed after it on the same module."""
    path = f"{_PEFT_PREFIX}{layer}.{TARGETS[name].peft_path}"
    if name == "gate_up_proj" and "down_proj" in names:
        path += ".base_layer"
    return path


def _peft_factors(name: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Our (a [..., in..., r], b [..., r, out...]) -> PEFT's (lora_A.weight, lora_B.weight)."""
    rank = a.shape[-1]
    if TARGETS[name].experts:  # lora_A rows are expert-major, lora_B columns rank-major
        experts, inputs, outputs = a.shape[0], a.shape[1], b.shape[-1]
        return (a.transpose(0, 2, 1).reshape(experts * rank, inputs),
                b.transpose(2, 1, 0).reshape(outputs, rank * experts))
    return a.reshape(-1, rank).T, b.reshape(rank, -1).T


def _our_factors(name: str, lora_a: np.ndarray, lora_b: np.ndarray, a_shape, b_shape):
    if TARGETS[name].experts:
        experts, inputs, rank = a_shape
        outputs = b_shape[-1]
        a = lora_a.reshape(experts, rank, inputs).transpose(0, 2, 1)
        b = lora_b.reshape(outputs, rank, experts).transpose(2, 1, 0)
        return a, b
    return lora_a.T.reshape(a_shape), lora_b.T.reshape(b_shape)
