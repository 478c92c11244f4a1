"""Eval tasks: each is a list of problems (a user prompt, a reference answer, the grader that compares them).

  gsm8k      GSM8K rows {question, answer ending in `#### n`}; the question as asked; numeric grader.
  aime       {question (or problem), answer}; the question, then the gpt-oss evals' instruction to box the
             answer; boxed_integer grader.
  gpqa       the GPQA columns (Question, Correct Answer, Incorrect Answer 1-3; CSV or JSONL); the four choices
             shuffled with a fixed seed and laid out as in the gpt-oss evals; mcq grader.
  math       {problem, answer (or a solution with a boxed answer)}; the AIME instruction; math grader.
  synthetic  the tiny demo's counting questions (`gptoss_jax.synthetic`, held-out seed); numeric grader.
  custom     any other task name is a JSONL file of {prompt, answer, grader[, id]}; the task is named after the
             file.

A task entry may name built-in tools after a `+`: "aime+python" is AIME with the python tool (as the model card
reports it), "gsm8k+python+browser" both tools; the model may call them while it reasons (`gptoss_jax.agent`).
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path
from typing import Any

from gptoss_jax.eval.graders import GRADERS, answer_number, boxed
from gptoss_jax.harmony import BUILTIN_TOOLS
from gptoss_jax.records import DataError, read_records
from gptoss_jax.synthetic import count, counting_problems

BUILTIN = ("gsm8k", "aime", "gpqa", "math", "synthetic")
BOX_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MCQ_INSTRUCTION = "Express your final answer as the corresponding option 'A', 'B', 'C', or 'D'."
_CUSTOM_KEYS = {"prompt", "answer", "grader", "id"}


class TaskError(ValueError):
    """A task that cannot be read; the message names the file (and line) and what was expected."""


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    prompt: str  # the user message
    answer: str  # the reference answer, as the grader reads it
    grader: str


def task_tools(entry: str) -> tuple[str, tuple[str, ...]]:
    """(the task's data entry, its built-in tools) of an entry such as "aime+python"."""
    base, *tools = entry.split("+")
    if tools and all(tool in BUILTIN_TOOLS for tool in tools):
        return base, tuple(tools)
    return entry, ()


def task_name(entry: str) -> str:
    """A task's name in reports: the built-in name, or a custom file's stem; with its tools ("aime+python")."""
    base, tools = task_tools(entry)
    return "+".join([base if base in BUILTIN else Path(base).stem, *tools])


def load_task(entry: str, data: Any, *, limit: int = 0, seed: int = 0) -> list[Problem]:
    """The problems of a built-in task (read from `data.<name>.source`) or of a custom JSONL file; the first
    `limit` of them when limit > 0. Raises TaskError on an unreadable, malformed or empty source."""
    entry = task_tools(entry)[0]
    if entry == "synthetic":
        problems = _synthetic(data.synthetic.count, data.synthetic.seed)
    elif entry in BUILTIN:
        source = data[entry].source
        if not source:
            raise TaskError(f"task {entry!r} has no data: set --config.data.{entry}.source=FILE_OR_HUB_ID")
        reader = {"gsm8k": _gsm8k, "aime": _aime, "gpqa": _gpqa, "math": _math}[entry]
        problems = [reader(row, index, seed) for index, row in enumerate(_rows(source, data[entry].split))]
    elif entry.endswith((".jsonl", ".json")) or Path(entry).exists():
        problems = _custom(entry)
    else:
        raise TaskError(f"unknown task {entry!r}: expected one of {', '.join(BUILTIN)} or a JSONL file of "
                        "{prompt, answer, grader}")
    if not problems:
        raise TaskError(f"task {entry!r}: no problems in its data")
    return problems[:limit] if limit > 0 else problems


def _rows(source: str, split: str) -> list[tuple[str, dict]]:
    rows = []
    try:
        for where, row in read_records(source, split=split):
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, dict):
                raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}")
            rows.append((where, row))
    except DataError as error:
        raise TaskError(str(error)) from None
    return rows


def _field(where: str, row: dict, *names: str) -> str:
    for name in names:
        if row.get(name) not in (None, ""):
            return str(row[name]).strip()
    raise TaskError(f"{where}: missing {' or '.join(repr(n) for n in names)}")


def _gsm8k(item: tuple[str, dict], index: int, seed: int) -> Problem:
    where, row = item
    _, separator, number = _field(where, row, "answer").rpartition("####")
    if not separator or not number.strip():
        raise TaskError(f"{where}: the GSM8K answer has no '#### <number>' line")
    return Problem(str(index), _field(where, row, "question"), number.strip(), "numeric")


def _aime(item: tuple[str, dict], index: int, seed: int) -> Problem:
    where, row = item
    answer = _field(where, row, "answer")
    if not re.match(r"\s*-?\d+", answer):
        raise TaskError(f"{where}: an AIME answer is an integer, got {answer!r}")
    return Problem(str(index), f"{_field(where, row, 'question', 'problem')}\n{BOX_INSTRUCTION}", answer,
                   "boxed_integer")


def _math(item: tuple[str, dict], index: int, seed: int) -> Problem:
    where, row = item
    if row.get("answer") not in (None, ""):
        answer = str(row["answer"]).strip()
    else:
        answers = boxed(_field(where, row, "answer", "solution"))
        if not answers:
            raise TaskError(f"{where}: no 'answer', and the solution has no \\boxed{{}} answer")
        answer = answers[-1]
    return Problem(str(index), f"{_field(where, row, 'problem', 'question')}\n{BOX_INSTRUCTION}", answer, "math")


def _gpqa(item: tuple[str, dict], index: int, seed: int) -> Problem:
    where, row = item
    correct = _field(where, row, "Correct Answer")
    choices = [correct] + [_field(where, row, f"Incorrect Answer {n}") for n in (1, 2, 3)]
    random.Random(f"gpqa:{seed}:{index}").shuffle(choices)  # str seeds are stable across runs and platforms
    options = "\n".join(f"({letter}) {choice}" for letter, choice in zip("ABCD", choices, strict=True))
    prompt = f"{_field(where, row, 'Question')}\n\n{options}\n\n{MCQ_INSTRUCTION}"
    return Problem(str(index), prompt, "ABCD"[choices.index(correct)], "mcq")


def _synthetic(number: int, seed: int) -> list[Problem]:
    return [Problem(str(index), question, str(count(letters)), "numeric")
            for index, (question, letters) in enumerate(counting_problems(number, seed=seed))]


def _custom(path: str) -> list[Problem]:
    if not Path(path).is_file():
        raise TaskError(f"{path}: no such task file")
    problems, ids = [], set()
    for index, (where, row) in enumerate(_rows(path, "")):
        unknown = set(row) - _CUSTOM_KEYS
        if unknown:
            raise TaskError(f"{where}: unknown keys {sorted(unknown)}; a custom problem has {sorted(_CUSTOM_KEYS)}")
        grader = _field(where, row, "grader")
        if grader not in GRADERS:
            raise TaskError(f"{where}: unknown grader {grader!r}; expected one of {', '.join(GRADERS)}")
        answer = _field(where, row, "answer")
        _check_reference(where, answer, grader)
        problem_id = str(row.get("id", index))
        if problem_id in ids:
            raise TaskError(f"{where}: id {problem_id!r} repeats an earlier problem's")
        ids.add(problem_id)
        problems.append(Problem(problem_id, _field(where, row, "prompt"), answer, grader))
    return problems


def _check_reference(where: str, answer: str, grader: str) -> None:
    """A reference answer the grader can compare with, or a TaskError now rather than mid-sweep."""
    if grader == "regex":
        try:
            re.compile(answer)
        except re.error as error:
            raise TaskError(f"{where}: the answer is not a regular expression ({error})") from None
    expected = {"numeric": ("a number", answer_number(answer) is not None),
                "boxed_integer": ("an integer", re.fullmatch(r"\s*-?\d+\s*", answer) is not None),
                "mcq": ("a letter A-D", re.fullmatch(r"\s*\(?[A-Da-d]\)?\s*", answer) is not None)}
    if grader in expected and not expected[grader][1]:
        raise TaskError(f"{where}: the {grader} grader needs {expected[grader][0]} as the answer, got {answer!r}")
