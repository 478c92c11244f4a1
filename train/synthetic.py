"""A synthetic harmony reasoning set, generated deterministically: a count that an x sets back to zero.

"Count the rs, starting again from zero at every x: r, s, r, x, r, t, r, r, a, x, r, o. What is the count?" — the
final answer is the number of r's after the last x ("1"). The analysis depends on the reasoning effort in the
system message, as gpt-oss's does:
  low:    the answer alone                                ("Answer: 1.")
  medium: the running count after every second letter     ("Tally: r, s1 r, x0 r, t1 r, r3 a, x0 r, o1")
  high:   the running count after every letter            ("Tally: r1 s1 r2 x0 r1 t1 r2 r3 a3 x0 r1 o1")
Why writing the steps helps a small model: each written step adds 0 or 1 to the count just before it, or writes 0
at an x, a rule the tiny model learns in minutes. Answering at once (low) needs, in one forward pass, the last x's
position and the r's after it, which it does not learn in that time (a plain count it would: a count is an
average that one attention head computes, so the reset is what makes order matter). Every letter takes two tokens
in the question and in the analysis, so each step finds its letter the same distance back, a copy learned quickly.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

EFFORTS = ("low", "medium", "high")
TARGET, RESET, OTHERS = "r", "x", "saetoi"  # r adds one, x sets the count to zero, the others change nothing
LETTERS = 12
SHARES = {TARGET: 0.5, RESET: 0.1}  # the chance that a letter is the target or the reset; an other otherwise


def counting_problem(rng: random.Random) -> tuple[str, list[str]]:
    """(question, letters)."""
    letters = []
    for _ in range(LETTERS):
        draw = rng.random()
        letters.append(TARGET if draw < SHARES[TARGET] else RESET if draw < sum(SHARES.values()) else
                       rng.choice(OTHERS))
    return (f"Count the {TARGET}s, starting again from zero at every {RESET}: {', '.join(letters)}. "
            "What is the count?", letters)


def count(letters: list[str]) -> int:
    """The count after the letters: one per target, back to zero at every reset."""
    total = 0
    for letter in letters:
        total = 0 if letter == RESET else total + (letter == TARGET)
    return total


def analysis(letters: list[str], effort: str) -> str:
    """The effort's written steps: the running count after every `per_step` letters (only the answer for low)."""
    if effort == "low":
        return f"Answer: {count(letters)}."
    per_step = {"medium": 2, "high": 1}[effort]
    steps = [letter + (str(count(letters[:seen])) if seen % per_step == 0 or seen == len(letters) else ",")
             for seen, letter in enumerate(letters, start=1)]
    return "Tally: " + " ".join(steps)


def counting_records(number: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """`number` records cycling through the three efforts; the same (number, seed) always gives the same records."""
    rng = random.Random(seed)
    records = []
    for index in range(number):
        effort = EFFORTS[index % 3]
        question, letters = counting_problem(rng)
        answer = str(count(letters))
        records.append({
            "reasoning_effort": effort,
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "thinking": analysis(letters, effort), "content": answer},
            ],
            "answer": answer,
        })
    return records


def write_jsonl(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path
