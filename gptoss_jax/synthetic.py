"""A synthetic harmony reasoning set, generated deterministically: a count that an x sets back to zero.

"Count the rs, starting again from zero at every x: r, s, r, x, r, t, r, r, a, x, r, o." — the final answer is the
number of r's after the last x ("1"). The analysis depends on the reasoning effort in the system message, as
gpt-oss's does, and the more effort, the more of the running count it writes out:
  low:    the answer alone                              ("Answer: 1.")
  medium: the running count after every fourth letter   ("Sketch: r, s, r, x0 r, t, r, r3 a, x, r, o1")
  high:   the running count after every letter          ("Count: r1 s1 r2 x0 r1 t1 r2 r3 a3 x0 r1 o1")
Why writing the steps helps a small model: each step written after one letter adds 0 or 1 to the count just
before it, or writes 0 at an x, a rule the tiny model learns in minutes. Answering at once needs, in one forward
pass, the last x's position and the r's after it, which it does not learn in that time (a plain count it would: a
count is an average that one attention head computes, so the reset is what makes order matter); medium's steps
of four letters are in between, each a small version of that problem. Every letter takes two tokens in the
question and in the analysis, and the question ends right before the reply, so each letter is copied from 31
tokens back: within the tiny model's 32-token window, so every layer can learn the copy.

The records cycle through low, medium, high, medium, high (CYCLE), and the training set is packed in order
(`data.shuffle = "rows"`) into rows of 640 tokens that each hold one cycle. Each effort's analysis starts with its
own word, and that first token is the only one that depends on the effort line. With shuffled examples a batch
holds the efforts in random proportions, and the model's guess of that word swung with each batch's mix instead of
following the effort line (learned after 600 of 700 steps in one run, never in another); with the same mix in
every row, what is left to learn there is the effort line. Low is asked half as often as the others: answering at
once is the skill the demo shows to be weak, and trained as often, the tiny model learned part of it in some runs
and not in others (47% to 63% right over three seeds, against medium's 65% to 71%).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

TARGET, RESET, OTHERS = "r", "x", "saetoi"  # r adds one, x sets the count to zero, the others change nothing
LETTERS = 12
SHARES = {TARGET: 0.5, RESET: 0.1}  # the chance that a letter is the target or the reset; an other otherwise
CYCLE = ("low", "medium", "high", "medium", "high")  # the efforts of consecutive records
EVERY = {"medium": 4, "high": 1}  # the analysis writes the running count after every EVERY[effort]-th letter
HEADERS = {"low": "Answer", "medium": "Sketch", "high": "Count"}  # each effort's first analysis token


def counting_problem(rng: random.Random) -> tuple[str, list[str]]:
    """(question, letters)."""
    letters = []
    for _ in range(LETTERS):
        draw = rng.random()
        letters.append(TARGET if draw < SHARES[TARGET] else RESET if draw < sum(SHARES.values()) else
                       rng.choice(OTHERS))
    return f"Count the {TARGET}s, starting again from zero at every {RESET}: {', '.join(letters)}.", letters


def counting_problems(number: int, *, seed: int) -> list[tuple[str, list[str]]]:
    """`number` (question, letters); the same (number, seed) always gives the same problems."""
    rng = random.Random(seed)
    return [counting_problem(rng) for _ in range(number)]


def count(letters: list[str]) -> int:
    """The count after the letters: one per target, back to zero at every reset."""
    total = 0
    for letter in letters:
        total = 0 if letter == RESET else total + (letter == TARGET)
    return total


def analysis(letters: list[str], effort: str) -> str:
    """The effort's written steps: each letter, followed by the running count after every EVERY[effort]-th (and
    the last) letter and by a comma after the others; only the answer for low."""
    if effort == "low":
        return f"{HEADERS[effort]}: {count(letters)}."
    steps = [letter + (str(count(letters[:seen])) if seen % EVERY[effort] == 0 or seen == len(letters) else ",")
             for seen, letter in enumerate(letters, start=1)]
    return f"{HEADERS[effort]}: " + " ".join(steps)


def counting_records(number: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """`number` records, a new question each, their efforts going round CYCLE; the same (number, seed) always gives
    the same records."""
    records = []
    for index, (question, letters) in enumerate(counting_problems(number, seed=seed)):
        effort = CYCLE[index % len(CYCLE)]
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
