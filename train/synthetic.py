"""A synthetic harmony reasoning set, generated deterministically: chained single-digit arithmetic.

"Start with 7. Add 5, then multiply by 3, then subtract 4. What is the result?" — the final answer is the
number; the analysis depends on the reasoning effort in the system message, as gpt-oss's does:
  low:    the answer alone            ("Answer: 32.")
  medium: one line per step           ("7+5=12. 12*3=36. 36-4=32.")
  high:   the steps, then a check back to the start.
A small model learns the format in minutes, and its accuracy can be compared across efforts.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

EFFORTS = ("low", "medium", "high")
_OPERATIONS = {"add": ("Add {n}", "+"), "subtract": ("subtract {n}", "-"), "multiply": ("multiply by {n}", "*")}
_INVERSE = {"+": "-", "-": "+", "*": "/"}


def arithmetic_problem(rng: random.Random) -> tuple[str, list[tuple[int, str, int, int]], int]:
    """(question, steps as (left, op, operand, result), answer) with 2-3 operations, at most one multiplication."""
    value = rng.randint(1, 9)
    question = [f"Start with {value}."]
    steps, phrases = [], []
    operations = rng.sample(["add", "subtract", "add", "multiply"], rng.randint(2, 3))
    for name in operations:
        operand = rng.randint(1, 9)
        phrase, symbol = _OPERATIONS[name]
        result = {"+": value + operand, "-": value - operand, "*": value * operand}[symbol]
        steps.append((value, symbol, operand, result))
        phrases.append(phrase.format(n=operand))
        value = result
    question.append(", then ".join(phrases).capitalize() + ". What is the result?")
    return " ".join(question), steps, value


def analysis(steps: list[tuple[int, str, int, int]], answer: int, effort: str) -> str:
    if effort == "low":
        return f"Answer: {answer}."
    lines = [f"{left}{op}{operand}={result}." for left, op, operand, result in steps]
    if effort == "medium":
        return " ".join(lines)
    check, value = [], answer
    for left, op, operand, _ in reversed(steps):
        check.append(f"{value}{_INVERSE[op]}{operand}={left}")
        value = left
    return "Step by step. " + " ".join(lines) + " Check: " + ", ".join(check) + f". Answer {answer}."


def arithmetic_records(count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """`count` records cycling through the three efforts; the same (count, seed) always gives the same records."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        effort = EFFORTS[index % 3]
        question, steps, answer = arithmetic_problem(rng)
        records.append({
            "reasoning_effort": effort,
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "thinking": analysis(steps, answer, effort), "content": str(answer)},
            ],
            "answer": str(answer),
        })
    return records


def write_jsonl(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path
