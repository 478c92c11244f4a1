"""Rewards for reinforcement learning: each scores one sampled completion of one prompt.

A reward is named in the config and called as `reward(sample, example) -> float`:

  sample   a `Sample`: the completion's harmony text, its analysis and final-channel texts (the final is None when
           the completion never reached the final channel), whether it parsed as harmony and ended with
           <|return|>, its token counts, whether max_completion_tokens cut it, and the reasoning effort asked for.
  example  the problem the prompt came from: {"id", "prompt", "answer", "grader"} (an eval task's problem).

Built-in names:
  grader        1.0 when the problem's own grader finds its "answer" in the final channel, else 0.0.
  grader:NAME   the same with the eval grader NAME (numeric, boxed_integer, math, mcq, exact, regex).
  format        1.0 when the completion is well-formed harmony: it parses, has a final answer, ends in <|return|>.
  length        minus the completion's share of max_completion_tokens (0 for an empty one, -1 for one that used it
                all): prefers shorter reasoning when added with a small weight.
Any other name is `module:function`, imported when the run starts (a missing module or function is a config
error), e.g. `my_rewards:json_valid` for `def json_valid(sample, example) -> float` in my_rewards.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gptoss_jax import harmony
from gptoss_jax import tokenizer as tok
from gptoss_jax.eval.graders import GRADERS, grade
from gptoss_jax.settings import ConfigError

BUILTIN = ("grader", "format", "length", *(f"grader:{name}" for name in GRADERS))

Reward = Callable[["Sample", Mapping[str, Any]], float]


@dataclasses.dataclass(frozen=True)
class Sample:
    text: str  # the completion as harmony text (after the prompt's `<|start|>assistant`)
    analysis: str
    final: str | None  # None: the completion never reached the final channel
    well_formed: bool  # parsed without errors, has a final message, ends in <|return|>
    tokens: int
    max_tokens: int  # the completion budget it was sampled with
    truncated: bool  # cut by the budget
    effort: str

    @classmethod
    def of(cls, tokens: list[int], *, max_tokens: int, effort: str) -> Sample:
        """The sample a completion's tokens make (as `Generator.generate` returns them)."""
        parsed = harmony.parse(tokens, role="assistant")
        messages = parsed.messages + ([parsed.partial] if parsed.partial else [])
        finals = [m.text for m in parsed.messages if m.channel == "final"]
        ended = bool(tokens) and tokens[-1] == tok.RETURN
        return cls(text=tok.get_encoding().decode(tokens),
                   analysis="".join(m.text for m in messages if m.channel == "analysis"),
                   final=finals[-1] if finals else None,
                   well_formed=ended and bool(finals) and parsed.error is None,
                   tokens=len(tokens), max_tokens=max_tokens,
                   truncated=not ended and len(tokens) >= max_tokens, effort=effort)


def _grader(name: str | None) -> Reward:
    """The grader `name`, or the example's own (None)."""

    def reward(sample: Sample, example: Mapping[str, Any]) -> float:
        if sample.final is None:
            return 0.0
        return float(grade(name or example["grader"], sample.final, str(example["answer"])).correct)

    return reward


def _format(sample: Sample, example: Mapping[str, Any]) -> float:
    return float(sample.well_formed)


def _length(sample: Sample, example: Mapping[str, Any]) -> float:
    return -sample.tokens / max(sample.max_tokens, 1)


def resolve(name: str, where: str = "grpo.rewards") -> Reward:
    """The reward a config names, or a ConfigError saying what is wrong with the name."""
    if name == "format":
        return _format
    if name == "length":
        return _length
    if name == "grader":
        return _grader(None)
    if name.startswith("grader:"):
        grader = name.removeprefix("grader:")
        if grader not in GRADERS:
            raise ConfigError(f"{where}: unknown grader {grader!r} in {name!r}; expected one of {', '.join(GRADERS)}")
        return _grader(grader)
    module_name, _, function_name = name.partition(":")
    if not module_name or not function_name:
        raise ConfigError(f"{where}: {name!r} is neither a built-in reward ({', '.join(BUILTIN)}) nor "
                          "'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{where}: cannot import {module_name!r} for reward {name!r}: {error}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"{where}: {module_name!r} has no function {function_name!r} (reward {name!r})")
    return function


class RewardError(RuntimeError):
    """A reward function that raised, with the reward's name and the sample it was scoring."""


def score(rewards: Sequence[tuple[str, Reward, float]], sample: Sample, example: Mapping[str, Any], *,
          on_error: str = "zero") -> tuple[float, dict[str, float], list[str]]:
    """(weighted total, each reward's value, error reports) of one sample. A reward that raises scores 0 and is
    reported with the sample (`on_error="zero"`), or stops the run with a RewardError (`"raise"`)."""
    values, errors = {}, []
    for name, reward, _ in rewards:
        try:
            values[name] = float(reward(sample, example))
            if not math.isfinite(values[name]):
                raise ValueError(f"returned {values[name]}, not a finite number")
        except Exception as error:  # noqa: BLE001 - user code: report it with the sample it failed on
            report = (f"reward {name!r} raised {type(error).__name__}: {error} on the sample {sample.text[:200]!r} "
                      f"(example {dict(example)!r:.200})")
            if on_error == "raise":
                raise RewardError(report) from error
            values[name] = 0.0
            errors.append(report)
    return sum(weight * values[name] for name, _, weight in rewards), values, errors
