"""Graders on tricky replies, and the task loaders on good and bad files."""

import json
from fractions import Fraction

import ml_collections
import pytest

from gptoss_jax.eval import report
from gptoss_jax.eval.graders import answer_format, answer_text, boxed, grade, math_equal, numbers
from gptoss_jax.eval.sweep import defaults
from gptoss_jax.eval.tasks import BOX_INSTRUCTION, MCQ_INSTRUCTION, TaskError, load_task

from helpers import SHARED, needs_shared

GSM8K = "data/gsm8k/test.jsonl"


@pytest.mark.parametrize("reply, reference, parsed, correct", [
    ("She makes $1,234,567 in total.", "1234567", "1234567", True),  # thousands separators
    ("The answer is 1,000 dollars.", "1000", "1000", True),
    ("18 dollars per day", "18", "18", True),  # units
    ("It costs $18.00.", "18", "18", True),
    ("The temperature drops to -7 degrees.", "-7", "-7", True),  # negative
    ("The temperature drops to −7 °C.", "-7", "-7", True),  # unicode minus
    ("From 12 we take 5-3, leaving 10", "10", "10", True),  # a minus between numbers is not a sign
    ("#### 72", "72", "72", True),
    ("Answer: 42. (We used 3 steps.)", "42", "42", True),  # "answer:" beats the last number
    ("The ratio is \\frac{3}{4}.", "0.75", "3/4", True),  # \frac
    ("It is 3/4 of the cake", "3/4", "3/4", True),
    ("50% of them, so 25", "25", "25", True),
    ("first \\boxed{12}, corrected: \\boxed{14}", "14", "14", True),  # several boxed: the last
    ("#### Step 1\nUnits: 9\n#### Step 2\nRevenue: 9 * 2 = $18\n\n**Answer: $18**", "18", "18", True),  # headings
    ("Final answer is 18.\n\nThis answer is consistent with all 3 checks.", "18", "18", True),
    ("The answer isn't 5; it's 7", "7", "7", True),
    ("The answer is 5 apples.", "5", "5", True),
    ("So the answer is -3, a loss.", "-3", "-3", True),
    ("\\boxed{10{,}000}", "10000", "10000", True),  # LaTeX thousands separator
    ("She ate 2\\frac{1}{2} pies", "2.5", "5/2", True),  # a mixed number
    ("x is 5.", "6", "5", False),
    ("I am not sure.", "6", None, False),
    ("", "6", None, False),
])
def test_numeric(reply, reference, parsed, correct):
    assert grade("numeric", reply, reference) == (parsed, correct)


def test_numbers_read_decimals_and_signs():
    assert numbers("a -1.5, b +2, c .25 and 1.3 and x2") == [Fraction(-3, 2), 2, Fraction(1, 4), Fraction(13, 10)]


@pytest.mark.parametrize("reply, reference, parsed, correct", [
    ("so \\boxed{33}", "33", "33", True),
    ("\\boxed{033}", "33", "33", True),
    ("\\boxed{\\text{{70}}}", "70", "70", True),  # nested braces
    ("first \\boxed{12} then \\boxed{}, finally \\boxed{204}", "204", "204", True),  # several; empty skipped
    ("\\boxed{3, 5}", "5", "5", True),  # a list: the last item, as the gpt-oss eval reads it
    ("no box, but the total is 117", "117", "117", True),  # last-integer fallback of the gpt-oss eval
    ("\\boxed 7", "7", "7", True),
    ("\\boxed{1{,}080}", "1080", "1080", True),
    ("nothing numeric", "7", None, False),
])
def test_boxed_integer(reply, reference, parsed, correct):
    assert grade("boxed_integer", reply, reference) == (parsed, correct)


def test_boxed_handles_nesting_and_unclosed_braces():
    assert boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b \\fbox{x} c \\boxed{open") == ["\\frac{1}{\\sqrt{2}}", "x"]


@pytest.mark.parametrize("answer, reference", [
    ("\\frac{1}{2}", "0.5"), ("\\dfrac12", "\\frac{1}{2}"), ("\\frac 1 2", "1/2"), (".5", "0.5"),
    ("\\left( 1, \\frac{1}{2} \\right)", "(1,\\frac12)"), ("x = 5", "5"), ("5 \\text{ cm}", "5"),
    ("30^\\circ", "30"), ("40\\%", "40"), ("1,000", "1000"), ("\\$18", "18"), ("\\sqrt2", "\\sqrt{2}"),
    ("[2, 3)", "[2,3)"), ("\\text{(B)}", "(B)"), ("-\\frac{3}{4}", "-0.75"), ("\\mathbf{5}", "5"),
])
def test_math_equivalent(answer, reference):
    assert math_equal(answer, reference)


@pytest.mark.parametrize("answer, reference", [
    ("\\frac{1}{3}", "0.33"), ("(1, 2)", "[1, 2]"), ("(1, 2)", "(1, 2, 3)"), ("2x", "2"), ("\\sqrt{3}", "\\sqrt{2}"),
    ("2 x", "2"), ("5 i", "5"),
])
def test_math_not_equivalent(answer, reference):
    assert not math_equal(answer, reference)


def test_math_grader_reads_the_last_box_only():
    assert grade("math", "try \\boxed{2}; no: \\boxed{\\frac{\\pi}{4}}", "\\frac{\\pi}{4}") == ("\\frac{\\pi}{4}", True)
    assert grade("math", "the answer is 1/2", "\\frac12") == (None, False)  # the prompt asks for a box


@pytest.mark.parametrize("reply, letter", [
    ("C", "C"), ("(B)", "B"), ("**D**", "D"), ("Answer: A", "A"), ("The answer is (C).", "C"),
    ("A good answer is B", "B"), ("\\boxed{D}", "D"), ("\\boxed{\\text{C}}", "C"), ("I pick option B.", "B"),
    ("B. Because the energy is conserved.", "B"), ("none of these", None),
    ("The answer is (B) because option D is unstable.", "B"),  # the stated answer beats options discussed after
    ("The correct answer is **B**.\n\nOption C would require more energy.", "B"),
    ("The answer: B. Choice C is close.", "B"), ("B\n\nExplanation: the D-isomer is less stable.", "B"),
    ("Not sure. Vitamin D.", None), ("So it must be\n(B)\nsince the rest fail.", "B"),
])
def test_mcq(reply, letter):
    assert grade("mcq", reply, "B") == (letter, letter == "B")


def test_exact_and_regex():
    assert grade("exact", "  **Paris.** ", "paris") == ("paris", True)
    assert grade("exact", "Paris, France", "Paris") == ("paris, france", False)
    assert grade("regex", "the code is X-42 today", r"X-(\d+)") == ("42", True)
    assert grade("regex", "no code", r"X-\d+") == (None, False)


def test_answer_in_analysis_but_not_final():
    """Graders see the final channel only: an answer reasoned out but never stated is not given."""
    analysis, final = "So 3 + 4 = 7. Answer 7.", "I could not finish."
    assert grade("numeric", analysis, "7").correct  # the same text in the final would count
    assert grade("numeric", final, "7") == (None, False)


def test_unknown_grader():
    with pytest.raises(ValueError, match="unknown grader 'fuzzy'"):
        grade("fuzzy", "x", "x")


def test_pass_at_k():
    assert report.pass_at_k(4, 0, 2) == 0 and report.pass_at_k(4, 3, 2) == 1
    assert report.pass_at_k(4, 1, 1) == pytest.approx(0.25) and report.pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert report.pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)


# ---- tasks -------------------------------------------------------------------------------------------------------


def _data(**sources):
    data = defaults().data
    for name, source in sources.items():
        data[name].source = source
    return data


@needs_shared(GSM8K)
def test_gsm8k_from_the_shared_copy():
    problems = load_task("gsm8k", _data(gsm8k=str(SHARED / GSM8K)), limit=3)
    assert len(problems) == 3 and problems[0].answer == "18" and problems[0].grader == "numeric"
    assert problems[0].prompt.startswith("Janet") and "####" not in problems[0].prompt


def test_aime_math_gpqa_prompts(tmp_path):
    (tmp_path / "aime.jsonl").write_text(json.dumps({"question": "Find n.", "answer": "070"}) + "\n")
    (tmp_path / "math.jsonl").write_text(json.dumps({"problem": "Half?", "solution": "It is \\boxed{\\frac12}."}))
    (tmp_path / "gpqa.csv").write_text("Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,"
                                       'Incorrect Answer 3\n"Which, of these?",right,w1,w2,w3\n')
    data = _data(aime=str(tmp_path / "aime.jsonl"), math=str(tmp_path / "math.jsonl"), gpqa=str(tmp_path / "gpqa.csv"))
    aime, = load_task("aime", data)
    assert aime.prompt == f"Find n.\n{BOX_INSTRUCTION}" and aime.answer == "070"
    assert BOX_INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."
    math_problem, = load_task("math", data)
    assert math_problem.answer == "\\frac12" and math_problem.grader == "math"
    gpqa, = load_task("gpqa", data, seed=0)
    assert gpqa.prompt.startswith("Which, of these?\n\n(A) ") and gpqa.prompt.endswith(MCQ_INSTRUCTION)
    assert f"({gpqa.answer}) right" in gpqa.prompt
    assert load_task("gpqa", data, seed=0) == [gpqa]  # a fixed seed: the same shuffle every time
    shuffles = {load_task("gpqa", data, seed=seed)[0].answer for seed in range(12)}
    assert len(shuffles) > 1  # and the seed does shuffle


def test_custom_tasks(tmp_path):
    path = tmp_path / "capitals.jsonl"
    path.write_text(json.dumps({"prompt": "Capital of France?", "answer": "Paris", "grader": "exact"}) + "\n"
                    + json.dumps({"prompt": "Code?", "answer": "X-\\d+", "grader": "regex", "id": "q2"}) + "\n")
    problems = load_task(str(path), _data())
    assert [p.id for p in problems] == ["0", "q2"] and problems[1].grader == "regex"


@pytest.mark.parametrize("content, message", [
    ("", "no problems"),
    ("{not json\n", r"capitals.jsonl:1: not JSON"),
    (json.dumps({"prompt": "p", "answer": "a", "grader": "fuzzy"}), r"capitals.jsonl:1: unknown grader 'fuzzy'"),
    (json.dumps({"prompt": "p", "grader": "exact"}), r"capitals.jsonl:1: missing 'answer'"),
    (json.dumps({"prompt": "p", "answer": "a", "grader": "exact", "hint": 1}), r"capitals.jsonl:1: unknown keys"),
    (json.dumps({"prompt": "p", "answer": "(", "grader": "regex"}), r"capitals.jsonl:1: the answer is not a regular"),
    ("[1, 2]\n", r"capitals.jsonl:1: expected a JSON object"),
    (json.dumps({"prompt": "p", "answer": "abc", "grader": "numeric"}), r"numeric grader needs a number"),
    (json.dumps({"prompt": "p", "answer": "seventy", "grader": "boxed_integer"}), r"needs an integer"),
    (json.dumps({"prompt": "p", "answer": "E", "grader": "mcq"}), r"mcq grader needs a letter A-D"),
])
def test_bad_task_files(tmp_path, content, message):
    path = tmp_path / "capitals.jsonl"
    path.write_text(content)
    with pytest.raises(TaskError, match=message):
        load_task(str(path), _data())


def test_unreadable_files_name_themselves(tmp_path):
    (tmp_path / "broken.json").write_text('[{"prompt": "p",\n "answer": }]')
    with pytest.raises(TaskError, match=r"broken.json:2: not JSON"):
        load_task(str(tmp_path / "broken.json"), _data())
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(TaskError, match=r"latin1.jsonl: not UTF-8 text"):
        load_task(str(tmp_path / "latin1.jsonl"), _data())


def test_unknown_task_and_missing_data(tmp_path):
    with pytest.raises(TaskError, match="unknown task 'gsm9k'"):
        load_task("gsm9k", _data())
    with pytest.raises(TaskError, match="no such file or directory"):
        load_task("gsm8k", _data(gsm8k=str(tmp_path / "absent.jsonl")))
    data = _data(gsm8k="")
    with pytest.raises(TaskError, match="data.gsm8k.source"):
        load_task("gsm8k", data)
    assert isinstance(data, ml_collections.ConfigDict)


@pytest.mark.parametrize("grader, final, reference, correct", [
    ("mcq", '{"answer":"B"}', "B", True),
    ("mcq", '{"answer":"C"}', "B", False),
    ("numeric", '{"answer":3.5}', "3.5", True),
    ("numeric", '{"answer":-12}', "-12", True),
    ("boxed_integer", '{"answer":42}', "42", True),
    ("math", '{"answer":"\\\\frac{1}{2}"}', "\\frac12", True),
    ("exact", '{"answer":"Paris"}', "Paris", True),
])
def test_answers_written_in_the_json_answer_format_are_graded_by_their_grader(grader, final, reference, correct):
    assert grade(grader, answer_text(grader, final), reference).correct is correct
    properties = answer_format(grader)["json_schema"]["schema"]["properties"]
    assert list(properties) == ["answer"]


@pytest.mark.parametrize("final", ["3.5", '{"value": 3}', "{not json", '["answer"]'])
def test_a_final_that_is_not_the_json_answer_format_is_a_parse_failure(final):
    assert answer_text("numeric", final) is None
    assert grade("numeric", answer_text("numeric", final), "3.5") == (None, False)
