"""The architecture of a gpt-oss model: presets, validation, and reading HF or original `config.json` files.

Field names follow the original checkpoint's `config.json` (openai/gpt-oss `ModelConfig`), plus the few
constants that file leaves implicit (`swiglu_alpha`, `rms_norm_eps`, `max_position_embeddings`). The layer
pattern is fixed by the architecture: even layers attend to a band of `sliding_window` keys, odd layers to
the whole causal prefix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

from gptoss_jax.settings import ConfigError

log = logging.getLogger(__name__)


KERNELS = ("xla", "pallas", "auto")


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
    num_hidden_layers: int
    num_experts: int
    experts_per_token: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    head_dim: int
    num_attention_heads: int
    num_key_value_heads: int
    sliding_window: int
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    # YaRN context extension; a factor of 1 is plain RoPE.
    rope_scaling_factor: float = 32.0
    rope_beta_fast: float = 32.0  # `rope_ntk_beta` in the original config
    rope_beta_slow: float = 1.0  # `rope_ntk_alpha` in the original config
    initial_context_length: int = 4096  # the pre-training context YaRN extends from
    rope_truncate: bool = False  # round the YaRN ramp bounds to integers (HF `truncate`; gpt-oss does not)
    max_position_embeddings: int = 131072
    # Attention and the MXFP4 experts through XLA ("xla") or the Pallas kernels of gptoss_jax.kernels ("pallas":
    # flash/decode attention with sinks and, for packed experts, the MXFP4 grouped matmul; interpret mode off a
    # GPU, for testing), or "auto": the kernels on a GPU, XLA elsewhere. Auto is the default because the programs
    # compiled for an H100 say so (benchmarks/RESULTS.md, "Compiled for an H100"): with the kernels, gpt-oss-20b's
    # prefill, LoRA step and decode steps have 1.6x to 13x shorter roofline times. Not part of the checkpoint: a
    # run-time choice (load_model(..., kernels=...)).
    kernels: str = "auto"
    # Positions per block of the XLA attention path: longer sequences attend a block of queries to a block of keys
    # at a time (gptoss_jax.ops.blockwise_attention: no [T, T] scores, skipped blocks outside the causal band);
    # sequences of at most one block attend densely. A run-time choice too.
    attention_block: int = 128
    # Tokens the experts take at a time, 0 for all at once. With a tile, the MoE runs over the tokens a tile at a
    # time and each tile is recomputed in the backward pass (model.MoE): no buffer holds more than a tile's (token,
    # expert) pairs — at 131,072 tokens the [pairs, 2 x 2880] activations of gpt-oss would be 5.6 GiB each — for one
    # more forward pass of the experts in the backward. For long sequences; a run-time choice too.
    moe_tile: int = 0
    # Quantization-aware training (train.qat): the experts multiply by their weights as an MXFP4 export will hold
    # them — an adapter's update merged in, then quantized and dequantized (gptoss_jax.mxfp4.fake_quantize) — and
    # gradients pass straight through to the float weights and adapters. A run-time choice too.
    qat: bool = False

    def __post_init__(self):
        if self.kernels not in KERNELS:
            raise ConfigError(f"GptOssConfig.kernels: expected one of {KERNELS}, got {self.kernels!r}")
        for field in dataclasses.fields(self):
            if field.type == "str":
                continue
            value = getattr(self, field.name)
            expected = {"int": int, "float": (int, float), "bool": bool}[field.type]
            if isinstance(value, bool) != (field.type == "bool") or not isinstance(value, expected):
                raise ConfigError(f"GptOssConfig.{field.name}: expected {field.type}, got {value!r}")
            if field.name == "moe_tile" and value >= 0:  # 0: no tiles
                continue
            if field.type != "bool" and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"GptOssConfig.{field.name}: must be a positive number, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"GptOssConfig.num_attention_heads: {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention shares each kv head)"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"GptOssConfig.head_dim: must be even (RoPE rotates the two halves of each head), got {self.head_dim}"
            )
        if self.experts_per_token > self.num_experts:
            raise ConfigError(
                f"GptOssConfig.experts_per_token: {self.experts_per_token} exceeds num_experts={self.num_experts}"
            )
        if self.rope_scaling_factor < 1:
            raise ConfigError(f"GptOssConfig.rope_scaling_factor: must be >= 1, got {self.rope_scaling_factor}")

    # ---- presets -------------------------------------------------------------------------------------------

    @classmethod
    def gpt_oss_20b(cls) -> GptOssConfig:
        return cls(**_REAL_MODEL, num_hidden_layers=24, num_experts=32)

    @classmethod
    def gpt_oss_120b(cls) -> GptOssConfig:
        return cls(**_REAL_MODEL, num_hidden_layers=36, num_experts=128)

    @classmethod
    def tiny(cls) -> GptOssConfig:
        """A few-million-parameter model (plus the real vocabulary) that trains on a laptop CPU.

        Sizes are multiples of 32 so its experts can be stored in MXFP4, and the window is short enough that
        banded attention matters on short sequences.
        """
        return cls(
            num_hidden_layers=4,
            num_experts=8,
            experts_per_token=4,
            vocab_size=201088,
            hidden_size=64,
            intermediate_size=64,
            head_dim=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=32,
        )

    def replace(self, **changes: Any) -> GptOssConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"GptOssConfig: unknown field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    # ---- reading config.json -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path) -> GptOssConfig:
        """Reads a checkpoint directory's `config.json` (HF format) or `original/config.json`, or that file."""
        path = Path(path)
        if path.is_dir():
            candidates = [path / "config.json", path / "original" / "config.json"]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                raise ConfigError(
                    f"{candidates[0]}: not found (nor {candidates[1]}); expected a gpt-oss checkpoint directory "
                    "with an HF config.json or an original/config.json"
                )
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.from_hf_dict(data, source=path) if "model_type" in data else cls.from_original_dict(data)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None

    @classmethod
    def from_original_dict(cls, data: dict[str, Any]) -> GptOssConfig:
        """The 16 keys of the original checkpoint's `ModelConfig`."""
        _reject_unknown(data, _ORIGINAL_KEYS)
        missing = [key for key in _ORIGINAL_KEYS if key not in data]
        if missing:
            raise ConfigError(f"missing key(s) {missing} of the original gpt-oss config")
        fields = {_ORIGINAL_KEYS[key]: value for key, value in data.items()}
        return cls(**_as_floats(fields))

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str | Path = "config.json") -> GptOssConfig:
        """A transformers `GptOssConfig` as `save_pretrained` writes it (the rope block in either spelling).

        Like transformers, keys that describe no part of the architecture are accepted: the settings every
        transformers config carries quietly, any other (another trainer's extras, a misspelt optional key) with
        a warning naming it. Keys that shape the model are checked."""
        unused = [key for key in data if key not in _HF_KEYS and key not in _HF_REQUIRED_VALUES
                  and key not in _HF_IGNORED_KEYS and key not in _TRANSFORMERS_GENERIC_KEYS]
        if unused:
            log.warning("%s: ignoring %s: not part of the gpt-oss architecture", source, ", ".join(unused))
        for key, required in _HF_REQUIRED_VALUES.items():
            if key in data and data[key] != required:
                raise ConfigError(f"{key}: gpt-oss requires {required!r}, got {data[key]!r}")
        fields = {field: data[key] for key, field in _HF_KEYS.items() if key in data and field is not None}
        if "experts_per_token" in data:  # the released config.json spells this both ways
            if data.get("num_experts_per_tok", data["experts_per_token"]) != data["experts_per_token"]:
                raise ConfigError(
                    f"experts_per_token={data['experts_per_token']} disagrees with "
                    f"num_experts_per_tok={data['num_experts_per_tok']}"
                )
            fields.setdefault("experts_per_token", data["experts_per_token"])
        fields.update(_hf_rope_fields(data))
        missing = [key for key, field in _HF_KEYS.items() if field in _REQUIRED_FIELDS and field not in fields]
        if missing:
            raise ConfigError(f"missing key(s) {missing} of the HF gpt-oss config")
        config = cls(**_as_floats(fields))
        layer_types = data.get("layer_types")
        if layer_types is not None and list(layer_types) != config.layer_types:
            raise ConfigError(
                f"layer_types: gpt-oss alternates sliding and full attention starting with sliding "
                f"({config.layer_types[:4]}...), got {layer_types}"
            )
        return config

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers writes for this architecture (used for writing HF checkpoints)."""
        data = {key: getattr(self, field) for key, field in _HF_KEYS.items() if field is not None}
        data.update(
            model_type="gpt_oss",
            architectures=["GptOssForCausalLM"],
            attention_bias=True,
            hidden_act="silu",
            tie_word_embeddings=False,
            layer_types=self.layer_types,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": self.rope_theta,
                "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "original_max_position_embeddings": self.initial_context_length,
                "truncate": self.rope_truncate,
            },
        )
        return data

    # ---- derived -------------------------------------------------------------------------------------------

    @property
    def layer_types(self) -> list[str]:
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_hidden_layers)]

    @property
    def num_banded_layers(self) -> int:
        return (self.num_hidden_layers + 1) // 2

    @property
    def num_full_layers(self) -> int:
        return self.num_hidden_layers // 2


_REAL_MODEL = dict(
    experts_per_token=4,
    vocab_size=201088,
    hidden_size=2880,
    intermediate_size=2880,
    head_dim=64,
    num_attention_heads=64,
    num_key_value_heads=8,
    sliding_window=128,
)

_REQUIRED_FIELDS = {
    f.name for f in dataclasses.fields(GptOssConfig) if f.default is dataclasses.MISSING
}

# original/config.json key -> field
_ORIGINAL_KEYS = {
    "num_hidden_layers": "num_hidden_layers",
    "num_experts": "num_experts",
    "experts_per_token": "experts_per_token",
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "swiglu_limit": "swiglu_limit",
    "head_dim": "head_dim",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "sliding_window": "sliding_window",
    "initial_context_length": "initial_context_length",
    "rope_theta": "rope_theta",
    "rope_scaling_factor": "rope_scaling_factor",
    "rope_ntk_alpha": "rope_beta_slow",
    "rope_ntk_beta": "rope_beta_fast",
}

# HF config.json key -> field (None: read separately)
_HF_KEYS = {
    "num_hidden_layers": "num_hidden_layers",
    "num_local_experts": "num_experts",
    "num_experts_per_tok": "experts_per_token",
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "head_dim": "head_dim",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "sliding_window": "sliding_window",
    "swiglu_alpha": "swiglu_alpha",
    "swiglu_limit": "swiglu_limit",
    "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "experts_per_token": None,
    "initial_context_length": None,
    "rope_parameters": None,
    "rope_scaling": None,
    "rope_theta": None,
    "layer_types": None,
}

# Keys whose only supported value is the gpt-oss one.
_HF_REQUIRED_VALUES = {
    "model_type": "gpt_oss",
    "attention_bias": True,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}

# Keys that do not change the forward pass (training, generation and bookkeeping settings).
# `quantization_config` is read by the checkpoint loader, which knows the tensors it describes.
_HF_IGNORED_KEYS = {
    "_name_or_path",
    "architectures",
    "attention_dropout",
    "bos_token_id",
    "dtype",
    "eos_token_id",
    "initializer_range",
    "output_router_logits",
    "pad_token_id",
    "quantization_config",
    "router_aux_loss_coef",
    "torch_dtype",
    "transformers_version",
    "use_cache",
}

# Settings every transformers config carries (PreTrainedConfig's common attributes, in 4.x and 5.x releases).
_TRANSFORMERS_GENERIC_KEYS = {
    "add_cross_attention", "bad_words_ids", "begin_suppress_tokens", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id",
    "forced_eos_token_id", "id2label", "is_decoder", "is_encoder_decoder", "label2id", "length_penalty",
    "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_labels",
    "num_return_sequences", "output_attentions", "output_hidden_states", "output_scores", "prefix",
    "problem_type", "pruned_heads", "remove_invalid_values", "repetition_penalty", "return_dict",
    "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params", "temperature",
    "tf_legacy_loss", "tie_encoder_decoder", "tokenizer_class", "top_k", "top_p", "torchscript",
    "typical_p", "use_bfloat16",
}

_HF_ROPE_KEYS = {
    "rope_type": None,
    "type": None,
    "rope_theta": "rope_theta",
    "factor": "rope_scaling_factor",
    "beta_fast": "rope_beta_fast",
    "beta_slow": "rope_beta_slow",
    "original_max_position_embeddings": "initial_context_length",
    "truncate": "rope_truncate",
}


def _hf_rope_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Reads `rope_parameters` (transformers >= 5) or `rope_scaling` + `rope_theta` (earlier releases) with
    transformers' defaults: no block at all is gpt-oss's YaRN (factor 32 over 4096 positions); in a block, a
    missing type is plain RoPE, and a YaRN block without `truncate` truncates, without
    `original_max_position_embeddings` extends from `max_position_embeddings` (one without `factor` is refused)."""
    given = [key for key in ("rope_parameters", "rope_scaling") if data.get(key) is not None]
    if len(given) > 1:
        raise ConfigError("rope_parameters and rope_scaling: both given; keep one (transformers reads rope_scaling)")
    fields = {"rope_theta": data["rope_theta"]} if "rope_theta" in data else {}
    if not given:
        return fields
    key = given[0]
    rope = data[key]
    if not isinstance(rope, dict) or not rope:
        raise ConfigError(f"{key}: expected an object with a rope_type, got {rope!r}")
    _reject_unknown(rope, _HF_ROPE_KEYS, prefix=f"{key}.")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("yarn", "default"):
        raise ConfigError(f"{key}.rope_type: gpt-oss uses 'yarn' (or 'default' for plain RoPE), got {rope_type!r}")
    fields.update({field: rope[name] for name, field in _HF_ROPE_KEYS.items() if field and name in rope})
    if rope_type == "default":
        return {**fields, "rope_scaling_factor": 1.0}
    if "factor" not in rope:
        raise ConfigError(f"{key}.factor: missing; a YaRN block needs its scaling factor")
    fields.setdefault("rope_truncate", True)
    fields.setdefault("initial_context_length",
                      data.get("max_position_embeddings", GptOssConfig.max_position_embeddings))
    return fields


def _reject_unknown(data: dict[str, Any], known: dict[str, Any] | set[str], prefix: str = "") -> None:
    unknown = [key for key in data if key not in known]
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s} (known keys: {sorted(known)})")


def _as_floats(fields: dict[str, Any]) -> dict[str, Any]:
    """JSON writes 150000.0 as 150000; float fields accept integers written that way."""
    float_fields = {f.name for f in dataclasses.fields(GptOssConfig) if f.type == "float"}
    return {
        name: float(value) if name in float_fields and type(value) is int else value
        for name, value in fields.items()
    }
