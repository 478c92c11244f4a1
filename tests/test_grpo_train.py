"""`gptoss-jax train` with method = "grpo" on the tiny preset: LoRA on a packed MXFP4 base with every option at
once (KL to the adapters-off reference, inner steps, micro-batches, several rewards, one of them raising),
resumption after SIGKILL to bit-identical adapters, and the config errors a run is refused with."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_jax.train.config import ConfigError, load_config

from helpers import killed_run_resumes_bit_identically

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "train" / "grpo_tiny_demo.py"
FLAKY = '''
def flaky(sample, example):
    """Half a point for a completion of an even number of characters; raises on an odd number."""
    if len(sample.text) % 2:
        raise ValueError(f"odd length {len(sample.text)}")
    return 0.5
'''
# A random tiny packed base with adapters on every target: nothing here needs a trained model.
TINY = {"model.checkpoint": "", "model.preset": "tiny", "lora.enabled": True, "model.mxfp4": "packed",
        "lora.targets": "*", "grpo.prompts_per_step": 2, "grpo.group_size": 4, "grpo.max_completion_tokens": 12,
        "grpo.temperature": 1.0, "optimizer.learning_rate": 1e-2, "train.log_every": 1,
        "data.synthetic.num_train": 20}


def _overrides(output: Path, **settings) -> list[str]:
    return [f"--config.{key}={value}" for key, value in {**TINY, "train.output_dir": output, **settings}.items()]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """Two steps with every option on: KL to the reference (beta > 0), 2 inner updates over 2 micro-batches, a
    task grader + format + a user reward that raises on half the samples, an eval through the harness,
    quantization-aware training for the MXFP4 export (which the run then evaluates too)."""
    from gptoss_jax.train.grpo import train

    root = tmp_path_factory.mktemp("grpo")
    (root / "grpo_test_rewards.py").write_text(FLAKY)
    sys.path.insert(0, str(root))
    try:
        config = load_config(DEMO, _overrides(
            root / "run", **{"grpo.rewards": "grader,format,grpo_test_rewards:flaky", "grpo.reward_weights":
                             "(1.0, 0.5, 1.0)", "grpo.beta": 0.05, "grpo.inner_steps": 2, "optimizer.grad_accum": 2,
                             "grpo.eval_tasks": "synthetic", "grpo.eval_efforts": "low", "grpo.eval_limit": 2,
                             "grpo.eval_max_tokens": 8, "train.steps": 2, "train.eval_every": 2,
                             "train.checkpoint_every": 1, "train.qat": True, "export.mxfp4": True}))
        return train(config, progress=False), root / "run"
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("grpo_test_rewards", None)


def test_a_run_logs_rewards_kl_and_clipping_evaluates_and_exports(grpo_run):
    result, output = grpo_run
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "reward" in line]
    assert [line["step"] for line in steps] == [1, 2] and result.steps == 2
    for line in steps:
        assert line["kl"] >= 0 and 0 <= line["clip_fraction"] <= 1 and line["grad_norm"] > 0
        assert line["rollout_tokens_per_s"] > 0 and 1 <= line["completion_tokens"] <= 12
        assert line["reward_by_effort/low"] == pytest.approx(line["reward"])
        expected = line["reward_by_name/grader"] + 0.5 * line["reward_by_name/format"] + line[
            "reward_by_name/grpo_test_rewards:flaky"]
        assert line["reward"] == pytest.approx(expected, abs=1e-6)
    assert steps[1]["kl"] > 0  # the adapters moved away from the reference in step 1's updates
    assert [line for line in lines if "eval/synthetic/low" in line][0]["step"] == 2
    assert (output / "eval" / "step_2" / "report.md").is_file()
    assert sorted(p.name for p in (output / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert (output / "adapter" / "adapter_model.safetensors").is_file() and (output / "merged").is_dir()
    # QAT: the export read back is the policy as trained, so its greedy answers score the same
    final = [line for line in lines if "eval_exported/synthetic/low" in line]
    assert final[0]["step"] == 2 and (output / "eval" / "exported" / "report.md").is_file()
    assert final[0]["eval_exported/synthetic/low"] == result.evals[2]["synthetic/low"]
    assert "MXFP4 export: synthetic/low accuracy" in result.summary()


def test_a_reward_that_raises_is_reported_with_its_sample_and_the_run_goes_on(grpo_run):
    result, output = grpo_run
    errors = [json.loads(line) for line in (output / "reward_errors.jsonl").read_text().splitlines()]
    assert errors and all("reward 'grpo_test_rewards:flaky' raised ValueError: odd length" in e["error"]
                          and "on the sample" in e["error"] for e in errors)
    logged = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert sum(line.get("reward_errors", 0) for line in logged) == len(errors)
    assert result.steps == 2


def _grpo_in_subprocess(output: Path):
    command = [sys.executable, "-m", "gptoss_jax.cli", "train", "--config", str(DEMO),
               *_overrides(output, **{"train.steps": 4, "train.checkpoint_every": 2, "export.merged": False,
                                      "grpo.eval_tasks": "()"})]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_run_resumes_to_bit_identical_adapters(tmp_path):
    """Rollouts are seeded by (train.seed, step, row) and prompts chosen by step: a run killed after its step-2
    checkpoint and resumed samples, scores and updates exactly as an uninterrupted one."""
    killed_run_resumes_bit_identically(_grpo_in_subprocess, tmp_path)
    rewards = {run: [json.loads(line)["reward"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                     if "reward" in line] for run in ("straight", "killed")}
    assert rewards["straight"][2:] == rewards["killed"][-2:]  # steps 3 and 4 sampled the same completions


@pytest.mark.parametrize("settings, message", [
    ({"grpo.rewards": "grader:nope"}, r"config.grpo.rewards\[0\]: unknown grader 'nope'"),
    ({"grpo.rewards": "grader,no_such_module_here:f", "grpo.reward_weights": "(1.0, 1.0)"},
     r"config.grpo.rewards\[1\]: cannot import 'no_such_module_here'"),
    ({"grpo.rewards": "grader,format"}, "config.grpo.reward_weights: one weight per reward"),
    ({"grpo.group_size": 1}, "config.grpo.group_size: a group needs at least 2"),
    ({"grpo.efforts": "low,extreme"}, "config.grpo.efforts"),
    ({"grpo.temperature": 0.0}, "temperature > 0"),
    ({"grpo.normalisation": "mean"}, "config.grpo.normalisation: expected one of"),
    ({"grpo.overlong": "drop"}, "config.grpo.overlong: expected one of"),
    ({"grpo.beta": -0.1}, "config.grpo.beta: must be >= 0"),
    ({"grpo.eval_limit": -1}, "config.grpo.eval_limit: must be >= 0"),
])
def test_bad_grpo_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, [f"--config.{key}={value}" for key, value in settings.items()])


@pytest.mark.parametrize("settings, message", [
    ({"grpo.task": "gsm8k"}, "config.grpo.source: task 'gsm8k' needs its data"),
    ({"grpo.task": "no_such_tasks.jsonl"}, "config.grpo.task: no_such_tasks.jsonl: no such task file"),
    ({"optimizer.grad_accum": 3}, "config.optimizer.grad_accum: 3 micro-batches do not split a step's 2 x 4"),
])
def test_a_run_refuses_a_task_or_split_it_cannot_use_before_it_starts(settings, message, tmp_path):
    from gptoss_jax.train.grpo import train

    with pytest.raises(ConfigError, match=message):
        train(load_config(DEMO, _overrides(tmp_path, **settings)), progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_plan_counts_the_larger_of_the_update_and_the_rollouts():
    """A GRPO plan compiles the update (its batch: prompts x group of max_prompt + max_completion tokens) and the
    rollouts (the KV cache of as many rows, prefill and decode); what stays (parameters, optimizer) plus the larger
    of the two is the total."""
    import gptoss_jax
    from gptoss_jax.train.plan import plan

    config = load_config(DEMO, _overrides(Path("unused"), **{"grpo.max_prompt_tokens": 100}))
    report = plan(config, device_memory=2**30)
    c, rows, capacity = gptoss_jax.GptOssConfig.tiny(), 2 * 4, 100 + 12
    full_cache = 2 * c.num_full_layers * rows * capacity * c.num_key_value_heads * c.head_dim * 4  # float32 k, v
    assert report.rollout_bytes > full_cache > 0
    assert report.batch_bytes == rows * 112 * (4 * 4 + 1)  # 4 int32 arrays and the counted mask, 100 + 12 positions
    stays = report.frozen_bytes + report.trainable_bytes + report.optimizer_bytes
    assert report.total_bytes == stays + max(report.batch_bytes + report.temporary_bytes, report.rollout_bytes)
    assert "rollouts: KV cache, policy, generation" in report.report()
