import json

import numpy as np
import pytest
import transformers
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

from gptoss_jax.config import ConfigError, GptOssConfig
from gptoss_jax.model import rope_frequencies

from hf_models import hf_config
from released import hub_config

# original/config.json of gpt-oss-20b, as released.
ORIGINAL_20B = {
    "num_hidden_layers": 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088,
    "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
    "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128, "initial_context_length": 4096,
    "rope_theta": 150000, "rope_scaling_factor": 32.0, "rope_ntk_alpha": 1, "rope_ntk_beta": 32,
}

HF_120B = hub_config(layers=36, experts=128)


def test_presets_hold_the_published_architecture():
    small, large = GptOssConfig.gpt_oss_20b(), GptOssConfig.gpt_oss_120b()
    assert (small.num_hidden_layers, small.num_experts) == (24, 32)
    assert (large.num_hidden_layers, large.num_experts) == (36, 128)
    for config in (small, large):
        assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
            2880, 64, 8, 64)
        assert (config.vocab_size, config.sliding_window, config.experts_per_token) == (201088, 128, 4)
        assert (config.rope_theta, config.rope_scaling_factor, config.initial_context_length) == (150000, 32, 4096)
        assert (config.swiglu_alpha, config.swiglu_limit, config.rms_norm_eps) == (1.702, 7.0, 1e-5)
    assert GptOssConfig.tiny().vocab_size == 201088


def test_original_config_reads_as_the_20b_preset(tmp_path):
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "config.json").write_text(json.dumps(ORIGINAL_20B))
    assert GptOssConfig.from_pretrained(tmp_path) == GptOssConfig.gpt_oss_20b()
    assert GptOssConfig.from_pretrained(tmp_path / "original" / "config.json") == GptOssConfig.gpt_oss_20b()


def test_released_hf_config_reads_as_the_120b_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_120B))
    assert GptOssConfig.from_pretrained(tmp_path) == GptOssConfig.gpt_oss_120b()


def test_config_written_by_transformers_round_trips(tmp_path):
    hf_config(num_hidden_layers=5, sliding_window=7).save_pretrained(tmp_path)
    config = GptOssConfig.from_pretrained(tmp_path)
    assert (config.num_hidden_layers, config.sliding_window, config.num_experts) == (5, 7, 6)
    # ours -> HF dict -> transformers -> config.json -> ours
    transformers.GptOssConfig(**config.to_hf_dict()).save_pretrained(tmp_path / "again")
    assert GptOssConfig.from_pretrained(tmp_path / "again") == config


def test_keys_transformers_ignores_are_accepted_and_others_named(tmp_path, caplog):
    written = hf_config(num_hidden_layers=5, sliding_window=7)
    written.save_pretrained(tmp_path)
    expected = GptOssConfig.from_pretrained(tmp_path)
    everything = written.to_dict()  # the generic keys save_pretrained leaves out: output_hidden_states, ...
    assert {"output_hidden_states", "chunk_size_feed_forward", "return_dict"} <= set(everything)
    (tmp_path / "config.json").write_text(json.dumps(everything))
    with caplog.at_level("WARNING", logger="gptoss_jax.config"):
        assert GptOssConfig.from_pretrained(tmp_path) == expected
    assert not caplog.records
    (tmp_path / "config.json").write_text(json.dumps({**everything, "unsloth_version": "2025.8", "moe_shared": 2}))
    with caplog.at_level("WARNING", logger="gptoss_jax.config"):
        assert GptOssConfig.from_pretrained(tmp_path) == expected
    assert [record.getMessage() for record in caplog.records] == [
        f"{tmp_path / 'config.json'}: ignoring unsloth_version, moe_shared: not part of the gpt-oss architecture"]


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads"),
        (dict(head_dim=15), "head_dim"),
        (dict(experts_per_token=9, num_experts=8), "experts_per_token"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(sliding_window=2.5), "sliding_window"),
        (dict(rope_truncate=1), "rope_truncate"),
    ],
)
def test_invalid_values_name_the_field(change, key):
    with pytest.raises(ConfigError, match=rf"GptOssConfig\.{key}\b"):
        GptOssConfig.tiny().replace(**change)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(num_key_value_heads=7), "num_attention_heads"),
        (lambda d: d["rope_scaling"].update(rope_type="longrope"), "rope_scaling.rope_type"),
        (lambda d: d["rope_scaling"].update(mscale=0.7), "unknown key rope_scaling.mscale"),
        (lambda d: d.update(tie_word_embeddings=True), "tie_word_embeddings"),
        (lambda d: d.update(layer_types=["full_attention"] * 36), "layer_types"),
        (lambda d: d.update(num_experts_per_tok=2), "experts_per_token"),
        (lambda d: d.pop("hidden_size"), "hidden_size"),
    ],
)
def test_bad_hf_config_files_name_file_and_key(tmp_path, edit, message):
    data = json.loads(json.dumps(HF_120B))
    edit(data)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message) as error:
        GptOssConfig.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(error.value)


YARN_BLOCK = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
              "original_max_position_embeddings": 4096}


@pytest.mark.parametrize("rope", [
    {},  # no rope block: transformers' gpt-oss default is YaRN, not plain RoPE
    {"rope_theta": 10000},
    {"rope_scaling": None, "rope_theta": 150000},
    {"rope_scaling": YARN_BLOCK},  # no `truncate`: transformers truncates
    {"rope_scaling": {**YARN_BLOCK, "truncate": False}},
    {"rope_parameters": {**YARN_BLOCK, "truncate": False, "rope_theta": 150000.0}},
    {"rope_scaling": {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096, "truncate": False}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 32.0}},  # extends from max_position_embeddings
    {"rope_theta": 10000, "rope_scaling": {**YARN_BLOCK, "rope_theta": 20000}},  # the block's theta wins
    {"rope_parameters": {"rope_type": "default", "rope_theta": 150000.0}},
    {"rope_scaling": {"factor": 32.0, "original_max_position_embeddings": 4096}},  # no type: plain RoPE
], ids=lambda rope: json.dumps(rope))
def test_rope_block_reads_as_transformers_reads_it(tmp_path, rope):
    data = {key: value for key, value in hub_config(layers=2, experts=4).items() if "rope" not in key}
    (tmp_path / "config.json").write_text(json.dumps({**data, **rope}))
    reference = GptOssRotaryEmbedding(transformers.AutoConfig.from_pretrained(tmp_path))
    inv_freq, concentration = rope_frequencies(GptOssConfig.from_pretrained(tmp_path))
    assert np.abs(inv_freq - reference.inv_freq.numpy()).max() <= 1e-6 * np.abs(inv_freq).max()  # float32 rounding
    assert concentration == pytest.approx(reference.attention_scaling, rel=1e-12)


@pytest.mark.parametrize("rope, message", [
    ({"rope_scaling": YARN_BLOCK, "rope_parameters": {"rope_type": "default"}}, "both given"),
    ({"rope_parameters": {}}, "rope_parameters: expected an object with a rope_type"),
    ({"rope_scaling": {"rope_type": "yarn"}}, "rope_scaling.factor: missing"),  # transformers: KeyError
])
def test_ambiguous_rope_blocks_are_refused(tmp_path, rope, message):
    data = {key: value for key, value in HF_120B.items() if "rope" not in key}
    (tmp_path / "config.json").write_text(json.dumps({**data, **rope}))
    with pytest.raises(ConfigError, match=message):
        GptOssConfig.from_pretrained(tmp_path)


def test_bad_original_config_names_the_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**ORIGINAL_20B, "rope_type": "yarn"}))
    with pytest.raises(ConfigError, match="unknown key rope_type"):
        GptOssConfig.from_pretrained(tmp_path)
    without_window = {key: value for key, value in ORIGINAL_20B.items() if key != "sliding_window"}
    (tmp_path / "config.json").write_text(json.dumps(without_window))
    with pytest.raises(ConfigError, match="sliding_window"):
        GptOssConfig.from_pretrained(tmp_path)


def test_missing_and_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        GptOssConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        GptOssConfig.from_pretrained(tmp_path)


def test_plan_offline_takes_a_released_checkpoint_from_its_preset_and_says_so(tmp_path):
    """`gptoss-jax plan` on a config naming openai/gpt-oss-20b, offline with nothing cached (the README's line on a
    fresh machine): the built-in preset, which is the released configuration, with a warning saying so; an
    unknown hub id still fails, naming it."""
    import os
    import subprocess
    import sys

    code = ("import logging; logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
            "from gptoss_jax.train import plan\nfrom gptoss_jax import GptOssConfig\n"
            "print(plan._architecture('openai/gpt-oss-20b') == (GptOssConfig.gpt_oss_20b(), True))\n"
            "try:\n    plan._architecture('someone/not-released')\nexcept OSError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == "True"
    assert result.stdout.splitlines()[1].startswith("someone/not-released: cannot get the model")
    assert ("openai/gpt-oss-20b: its config.json is not reachable" in result.stderr
            and "planning with the built-in gpt_oss_20b preset" in result.stderr)
