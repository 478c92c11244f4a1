"""GRPO's rewards: the graders on the final channel, harmony well-formedness, length, user functions by name, and
a reward that raises."""

import sys

import pytest

from gptoss_jax import tokenizer as tok
from gptoss_jax.train import rewards
from gptoss_jax.train.config import ConfigError

GOOD = "<|channel|>analysis<|message|>Tally: r1 s1 r2<|end|><|start|>assistant<|channel|>final<|message|>2<|return|>"


def _sample(text, max_tokens=64, effort="high"):
    return rewards.Sample.of(tok.get_encoding().encode(text, allowed_special="all"), max_tokens=max_tokens,
                             effort=effort)


def test_a_well_formed_completion_is_read_channel_by_channel():
    sample = _sample(GOOD)
    assert (sample.analysis, sample.final, sample.well_formed, sample.truncated) == ("Tally: r1 s1 r2", "2", True,
                                                                                    False)
    cut = _sample(GOOD.split("<|start|>")[0].removesuffix("<|end|>"), max_tokens=9)
    assert (cut.final, cut.well_formed, cut.truncated) == (None, False, True)


@pytest.mark.parametrize("name, text, example, value", [
    ("grader:numeric", GOOD, {"answer": "2"}, 1.0),
    ("grader:numeric", GOOD, {"answer": "3"}, 0.0),
    ("grader", GOOD, {"answer": "2", "grader": "numeric"}, 1.0),  # the problem's own grader
    ("grader", GOOD, {"answer": "2", "grader": "mcq"}, 0.0),
    ("grader:numeric", "<|channel|>analysis<|message|>The answer is 2<|end|>", {"answer": "2"}, 0.0),  # no final
    ("grader:mcq", GOOD.replace(">2<", ">The answer is (B)<"), {"answer": "B"}, 1.0),
    ("format", GOOD, {}, 1.0),
    ("format", GOOD.replace("<|return|>", ""), {}, 0.0),
    ("format", "<|channel|>final<|message|>2<|end|><|start|>oops<|return|>", {}, 0.0),
    ("length", GOOD, {}, -len(tok.get_encoding().encode(GOOD, allowed_special="all")) / 64),
])
def test_builtin_rewards(name, text, example, value):
    assert rewards.resolve(name)(_sample(text), example) == pytest.approx(value)


def test_user_rewards_by_module_and_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def short(sample, example):\n    return 1.0 if len(sample.analysis) < 20 else 0.0\n"
        "def broken(sample, example):\n    raise KeyError('score')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    named = [(name, rewards.resolve(name), weight) for name, weight in (("grader:numeric", 1.0),
                                                                          ("my_rewards:short", 0.5),
                                                                          ("my_rewards:broken", 2.0))]
    total, values, errors = rewards.score(named, _sample(GOOD), {"answer": "2"})
    assert (total, values) == (1.5, {"grader:numeric": 1.0, "my_rewards:short": 1.0, "my_rewards:broken": 0.0})
    assert len(errors) == 1 and "reward 'my_rewards:broken' raised KeyError" in errors[0] and "Tally" in errors[0]
    with pytest.raises(rewards.RewardError, match="my_rewards:broken"):
        rewards.score(named, _sample(GOOD), {"answer": "2"}, on_error="raise")
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize("name, message", [
    ("grader:nope", "unknown grader 'nope'"),
    ("accuracy", "neither a built-in reward"),
    ("no_such_module_here:f", "cannot import 'no_such_module_here'"),
    ("json:nothing_here", "'json' has no function 'nothing_here'"),
])
def test_bad_reward_names_are_config_errors(name, message):
    with pytest.raises(ConfigError, match=message):
        rewards.resolve(name)
