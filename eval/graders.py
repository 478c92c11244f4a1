"""Answer extraction and grading. A grader sees only the final channel — an answer that appears in the analysis
but never in the final message is not an answer — and returns what it parsed (None: nothing it could read) and
whether that equals the reference.

  numeric        GSM8K-style numbers: the number in the last boxed answer, else the last one stated right after
                 `####` or "answer is"/"answer:", else the last in the reply; read past thousands separators,
                 currency, units and percent signs, `\\frac{a}{b}`, mixed numbers and `a/b` fractions; compared
                 exactly (as fractions).
  boxed_integer  AIME: the last `\\boxed{}` (nested braces allowed; of a comma list, the last item), else the last
                 integer in the reply, as the gpt-oss AIME eval reads it; compared as integers.
  math           MATH-style: the last `\\boxed{}`, normalised (spacing, `\\left`/`\\right`, `\\dfrac`, `\\frac12`,
                 text and units, degrees, percent, `x =`), then equal as strings, as numbers, or item by item for
                 tuples and intervals.
  mcq            a letter A-D: boxed, else stated as the answer ("the answer is (B)"), else named as an option,
                 else leading the reply or alone on a line or in parentheses.
  exact          the reply equals the reference, ignoring case, surrounding spaces, markup and a final period.
  regex          the reference is a regular expression searched for in the reply (its first group, if it has one,
                 is the parsed answer).
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from typing import NamedTuple

GRADERS = ("numeric", "boxed_integer", "math", "mcq", "exact", "regex")


class Grade(NamedTuple):
    parsed: str | None  # the answer read from the reply; None when none could be read
    correct: bool


# What a grader's answer is, as a JSON schema, when the eval asks for answers as {"answer": ...}. Every one is
# bounded in length (a number's digits by its range and step), so a constrained answer always ends.
ANSWER_SCHEMAS = {"numeric": {"type": "number", "minimum": -10**15, "maximum": 10**15, "multipleOf": 1e-6},
                  "boxed_integer": {"type": "integer", "minimum": -10**15, "maximum": 10**15},
                  "mcq": {"type": "string", "enum": ["A", "B", "C", "D"]}}
TEXT_ANSWER_SCHEMA = {"type": "string", "maxLength": 256}  # the other graders' answers


def answer_format(grader: str) -> dict:
    """The response format that asks for the answer alone, as {"answer": ...} typed for the grader."""
    answer = ANSWER_SCHEMAS.get(grader, TEXT_ANSWER_SCHEMA)
    schema = {"type": "object", "properties": {"answer": answer}, "required": ["answer"],
              "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def answer_text(grader: str, final: str) -> str | None:
    """The text the grader reads from a final answer written in `answer_format` (a boxed value for the graders
    that read boxes); None when the final is not such an object."""
    try:
        value = json.loads(final)["answer"]
    except (json.JSONDecodeError, TypeError, KeyError):
        return None
    text = value if isinstance(value, str) else json.dumps(value)
    return f"\\boxed{{{text}}}" if grader in ("boxed_integer", "math") else text


def grade(grader: str, reply: str | None, reference: str) -> Grade:
    """Grades the final-channel `reply` against `reference` with the named grader (None: no answer to read)."""
    if grader not in GRADERS:
        raise ValueError(f"unknown grader {grader!r}; expected one of {', '.join(GRADERS)}")
    if reply is None:
        return Grade(None, False)
    return _GRADERS[grader](reply, str(reference))


# ---- finding the answer in a reply -------------------------------------------------------------------------------


_BOX = re.compile(r"\\(?:boxed|fbox|framebox)\b\s*")


def boxed(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` (braces nested to any depth) or `\\boxed 5`, in order."""
    found = []
    for match in _BOX.finditer(text):
        start = match.end()
        if text[start:start + 1] != "{":
            bare = re.match(r"[^\s$]+", text[start:])
            if bare:
                found.append(bare.group())
            continue
        depth = 0
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                found.append(text[start + 1:end])
                break
    return found


# A number: sign, digits (with comma thousands separators), decimals, an optional /denominator. Not preceded by a
# letter, digit or point, so "x2" and the "3" of "1.3" are not numbers of their own.
_NUMBER = re.compile(r"(?<![\w.])([-−+]?)\s?\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:\s?/\s?(\d+)(?!\.?\d))?")
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")


_MIXED_NUMBER = re.compile(r"(\d+)\s*\\[dt]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}")  # 2\frac{1}{2}


def numbers(text: str) -> list[Fraction]:
    """Every number in the text, in order, as exact fractions."""
    text = text.replace("{,}", ",")  # LaTeX's thousands separator: 10{,}000
    text = _MIXED_NUMBER.sub(lambda m: f"{int(m[1]) * int(m[3]) + int(m[2])}/{m[3]}" if int(m[3]) else m[0], text)
    text = _LATEX_FRACTION.sub(r"\1/\2", text)
    values = []
    for sign, digits, denominator in _NUMBER.findall(text):
        value = Fraction(digits.replace(",", ""))
        if denominator:
            if int(denominator) == 0:
                continue
            value /= int(denominator)
        values.append(-value if sign in "-−" and sign else value)
    return values


# Where a reply states its answer: `#### 18`, "answer is 18", "Answer: $18" — a number right after the marker (a
# markdown heading "#### Step 1" is not one, nor "the answer is consistent with 3 checks").
_STATED = re.compile(r"(?:####|(?i:answer)\s*(?:is|:|=))[ \t*_$]*(?=[-−+]?\$?\.?\d)")


def answer_number(reply: str) -> Fraction | None:
    """The number the reply gives as its answer: in the last boxed answer, else the last one stated right after
    `####` or "answer is"/"answer:", else the last in the reply."""
    box = [numbers(b) for b in boxed(reply)]
    if box and box[-1]:
        return box[-1][-1]
    stated = [numbers(reply[m.end():]) for m in _STATED.finditer(reply)]
    if stated:
        return stated[-1][0]
    found = numbers(reply)
    return found[-1] if found else None


# ---- graders -----------------------------------------------------------------------------------------------------


def _numeric(reply: str, reference: str) -> Grade:
    expected = answer_number(reference)
    if expected is None:
        raise ValueError(f"numeric grader: the reference {reference!r} holds no number")
    found = answer_number(reply)
    return Grade(None, False) if found is None else Grade(_show(found), found == expected)


def _show(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _boxed_integer(reply: str, reference: str) -> Grade:
    box = [b for b in boxed(reply) if b.strip()]
    text = box[-1].replace("{,}", "").split(",")[-1] if box else reply
    integers = re.findall(r"-?\d+", text)
    if not integers:
        return Grade(None, False)
    parsed = integers[0] if box else integers[-1]
    return Grade(str(int(parsed)), int(parsed) == int(re.match(r"\s*(-?\d+)", reference).group(1)))


def _mcq(reply: str, reference: str) -> Grade:
    letter = mcq_letter(reply)
    return Grade(letter, letter is not None and letter == reference.strip().strip("()").upper())


def mcq_letter(reply: str) -> str | None:
    """The letter the reply chooses: a boxed letter, else the last one stated as the answer ("answer is (B)",
    "Answer: B"), else the last named as an option or choice, else a letter leading the reply or standing alone on
    a line or in parentheses."""
    box = boxed(reply)
    if box:
        inner = re.fullmatch(r"\s*(?:\\text\{)?\s*\(?([A-D])\)?\s*\}?\s*", box[-1])
        if inner:
            return inner.group(1)
    for keyword in ("answer", "option|choice"):
        stated = re.findall(rf"(?i:{keyword})(?:\s+is)?\s*[:：]?\s*[*$(\[]*\s*([A-D])(?![A-Za-z])", reply)
        if stated:
            return stated[-1]
    leading = re.match(r"[\s*(\[]*([A-D])(?:[.):\]*]|\s*$)", reply)
    if leading:
        return leading.group(1)
    alone = re.findall(r"(?m)^[\s*]*\(?([A-D])\)?[\s*.]*$|\(([A-D])\)", reply)
    return "".join(alone[-1]) if alone else None


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().strip("*_`\"'").strip().rstrip(".").strip().casefold()


def _exact(reply: str, reference: str) -> Grade:
    parsed = _plain(reply)
    return Grade(parsed or None, bool(parsed) and parsed == _plain(reference))


def _regex(reply: str, reference: str) -> Grade:
    match = re.search(reference, reply)
    if match is None:
        return Grade(None, False)
    return Grade(match.group(1) if match.re.groups else match.group(0), True)


def _math(reply: str, reference: str) -> Grade:
    box = boxed(reply)
    if not box:
        return Grade(None, False)
    reference = boxed(reference)[-1] if boxed(reference) else reference
    return Grade(normalise_math(box[-1]), math_equal(box[-1], reference))


# ---- MATH-style normalisation ------------------------------------------------------------------------------------


def normalise_math(text: str) -> str:
    """A canonical spelling of a LaTeX answer: what two equal answers written differently share."""
    text = text.strip()
    for wrapper in ("text", "textbf", "mathrm", "mathbf", "mbox", "operatorname"):
        text = re.sub(r"\\" + wrapper + r"\s*\{([^{}]*)\}", r"\1", text)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
                     ("\\displaystyle", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^{\\circ}", ""),
                     ("^\\circ", ""), ("°", ""), ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""), ("−", "-")):
        text = text.replace(old, new)
    text = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", text)  # \frac12
    text = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", text)  # \frac{1}2
    text = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", text)  # \frac1{2}
    text = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", text)  # \sqrt2
    text = re.sub(r"^\s*[a-zA-Z]\s*=\s*", "", text)  # x = 5
    text = re.sub(r"^([-\d.,/ ]+?)\s+[a-zA-Z]{2,}[a-zA-Z ]*$", r"\1", text)  # 5 cm (not 2 x)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text.strip()):
        text = text.replace(",", "")
    text = re.sub(r"\s+", "", text).rstrip(".")
    text = re.sub(r"(?<!\d)\.(\d)", r"0.\1", text)
    return text


def _as_number(text: str) -> Fraction | None:
    match = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", text)
    try:
        if match:
            value = Fraction(match.group(2)) / Fraction(match.group(3))
            return -value if match.group(1) else value
        return Fraction(text) if re.fullmatch(r"-?\d+(\.\d+)?(/\d+)?", text) else None
    except ZeroDivisionError:
        return None


def math_equal(answer: str, reference: str) -> bool:
    """Equal after normalisation: as strings, as numbers, or item by item for tuples and intervals."""
    left, right = normalise_math(answer), normalise_math(reference)
    if left == right:
        return True
    numbers_ = _as_number(left), _as_number(right)
    if None not in numbers_:
        return numbers_[0] == numbers_[1]
    brackets = re.compile(r"([(\[])(.*)([)\]])")
    left_parts, right_parts = brackets.fullmatch(left), brackets.fullmatch(right)
    if left_parts and right_parts and (left_parts[1], left_parts[3]) == (right_parts[1], right_parts[3]):
        items = _split_top_level(left_parts[2]), _split_top_level(right_parts[2])
        return len(items[0]) == len(items[1]) > 1 and all(map(math_equal, *items))
    return False


def _split_top_level(text: str) -> list[str]:
    """Comma-separated items, not splitting inside braces or brackets."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"{": 1, "(": 1, "[": 1, "}": -1, ")": -1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [*items, current]


_GRADERS = {"numeric": _numeric, "boxed_integer": _boxed_integer, "math": _math, "mcq": _mcq, "exact": _exact,
            "regex": _regex}
