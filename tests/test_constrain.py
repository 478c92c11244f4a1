"""Structured outputs: the final answer (or a strict tool call's arguments) is held to its grammar, the analysis is
not, and rows without a constraint are untouched. The tiny random model writes garbage when free, so every answer
that parses and validates here does so because of the constraint; a reasoning budget drives it into the final
channel."""

import functools
import json
import re

import jsonschema
import numpy as np
import pytest
from flax import nnx

import gptoss_jax
from gptoss_jax import constrain, harmony
from gptoss_jax import tokenizer as tok
from gptoss_jax.generation import Generator

# Varied schemas, each bounded in length (strings by maxLength, patterns or enums, arrays by maxItems, numbers by
# range and step) so that a model which never chooses to stop still ends: an unbounded string can run on until
# max_tokens, as it can with OpenAI's structured outputs.
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colours": {"type": "array", "minItems": 1, "maxItems": 3,
                                                  "items": {"enum": ["red", "green", "blue"]}},
                                      "point": {"type": "object",
                                                "properties": {"x": {"type": "number", "minimum": -1.5,
                                                                     "maximum": 2.5, "multipleOf": 0.5},
                                                               "y": {"type": "integer", "minimum": -3,
                                                                     "maximum": 3}},
                                                "required": ["x"], "additionalProperties": False}},
     "required": ["colours", "point"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                      "note": {"type": "string", "maxLength": 5}},
     "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"enum": ["A", "B", "C", "D"]},
                                      "sure": {"type": "boolean"}},
     "required": ["answer", "sure"], "additionalProperties": False},
    {"type": "object", "properties": {"steps": {"type": "array", "maxItems": 4,
                                                "items": {"type": "integer", "minimum": 0, "maximum": 99}},
                                      "total": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.25}},
     "required": ["steps", "total"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"$ref": "#/$defs/person"},
                                      "friends": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/person"}}},
     "required": ["user"], "additionalProperties": False,
     "$defs": {"person": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
                                                          "tag": {"type": "string", "pattern": "^[a-z]{1,4}$"}},
                          "required": ["id", "tag"], "additionalProperties": False}}},
    {"type": "object", "properties": {"kind": {"const": "point"},
                                      "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                          {"type": "null"}]}},
     "required": ["kind", "value"], "additionalProperties": False},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^2026-(0[1-9]|1[0-2])-[0-2][0-9]$"},
                                      "level": {"enum": ["low", "medium", "high"]},
                                      "extra": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                "additionalProperties": False}},
     "required": ["date", "level"], "additionalProperties": False},
]
FINAL_OPENING = "<|end|><|start|>assistant<|channel|>final<|message|>"


@pytest.fixture(scope="module")
def generator():
    return Generator(gptoss_jax.GptOss(gptoss_jax.GptOssConfig.tiny(), dtype="float32", rngs=nnx.Rngs(0)))


def _in_analysis(record=None):
    """A chat prompt whose assistant turn has opened its analysis: the random model starts writing analysis."""
    opened = [tok.CHANNEL, *tok.get_encoding().encode_ordinary("analysis"), tok.MESSAGE]
    return harmony.encode_chat(record or {"messages": [{"role": "user", "content": "Answer in JSON."}]}) + opened


def _split(tokens):
    """(analysis text, final text) of an output that went through the budget's switch and ended in <|return|>."""
    text = tok.get_encoding().decode(tokens)
    analysis, final = text.split(FINAL_OPENING, 1)
    assert final.endswith("<|return|>"), final
    return analysis, final.removesuffix("<|return|>")


def test_two_hundred_schema_constrained_answers_all_validate_and_the_analysis_stays_free(generator):
    rows = 200
    finals = [constrain.Constraint("json_schema", SCHEMAS[row % len(SCHEMAS)]) for row in range(rows)]
    budgets = [2 + row % 7 for row in range(rows)]
    seeds = list(range(rows))
    constrained = generator.generate([_in_analysis()] * rows, 120, temperature=1.0, seed=seeds,
                                     constraints=constrain.RowConstraints(finals, reasoning_budget=budgets))
    free = generator.generate([_in_analysis()] * rows, 10, temperature=1.0, seed=seeds)
    garbage = 0
    for final, budget, tokens, unconstrained in zip(finals, budgets, constrained, free, strict=True):
        analysis, answer = _split(tokens)
        assert tokens[:budget] == unconstrained[:budget]  # the analysis is the model's own, token for token
        assert tok.get_encoding().decode(tokens[:budget]) == analysis
        jsonschema.validate(json.loads(answer), final.spec)
        garbage += unconstrained[budget] != tokens[budget]  # free, the model would not have closed its analysis
    assert garbage == rows


def test_free_rows_in_a_mixed_batch_equal_unconstrained_generate(generator):
    rows = 8
    finals = [constrain.Constraint("json_schema", SCHEMAS[row]) if row % 2 else None for row in range(rows)]
    budgets = [4 if final else None for final in finals]
    outputs = generator.generate([_in_analysis()] * rows, 60, temperature=1.0, seed=list(range(rows)),
                                 constraints=constrain.RowConstraints(finals, reasoning_budget=budgets))
    free = generator.generate([_in_analysis()] * rows, 60, temperature=1.0, seed=list(range(rows)))
    for row, final in enumerate(finals):
        if final is None:
            assert outputs[row] == free[row]
        else:
            jsonschema.validate(json.loads(_split(outputs[row])[1]), final.spec)


def test_a_regular_expression_and_a_lark_grammar(generator):
    expression = r"(yes|no), [0-9]{2}"
    grammar = 'start: verdict " because " reason\nverdict: "true" | "false"\nreason: /[a-z]{3,6}/'
    finals = [constrain.Constraint("regex", expression), constrain.Constraint("grammar", grammar)]
    outputs = generator.generate([_in_analysis()] * 2, 60, temperature=1.0, seed=[1, 2],
                                 constraints=constrain.RowConstraints(finals, reasoning_budget=[3, 5]))
    assert re.fullmatch(expression, _split(outputs[0])[1])
    assert re.fullmatch(r"(true|false) because [a-z]{3,6}", _split(outputs[1])[1])


def test_any_json_object_allows_exactly_the_continuations_of_an_object(generator):
    """"json" (OpenAI's json_object) has no length bound, so a random model writes a key forever; this checks
    the mask token by token along a valid object, then that only <|return|> may follow it."""
    encoding = tok.get_encoding()
    prompt = harmony.encode_chat({"messages": [{"role": "user", "content": "JSON"}]})
    state = constrain.start(prompt, constrain.Constraint("json"))
    bitmask = constrain.allocate(1, generator.model.config.vocab_size)
    allowed = functools.partial(_bit, bitmask)
    header = [tok.CHANNEL, *encoding.encode_ordinary("final"), tok.MESSAGE]
    for token in header:
        state.fill(bitmask, 0)
        assert allowed(token) and allowed(tok.RETURN) and allowed(tok.END)  # the header is free
        state.advance(token)
    state.fill(bitmask, 0)
    assert not allowed(encoding.encode_ordinary("[")[0]) and not allowed(encoding.encode_ordinary("1")[0])
    for token in encoding.encode_ordinary('{"a":[1,{"b":null}],"c":"d"}'):  # compact: no free whitespace
        state.fill(bitmask, 0)
        assert allowed(token) and not allowed(tok.RETURN) and not allowed(tok.END)
        state.advance(token)
    state.fill(bitmask, 0)
    assert [t for t in range(generator.model.config.vocab_size) if allowed(t)] == [tok.RETURN]


def _bit(bitmask, token):
    """Whether row 0 of the bitmask allows the token."""
    return bool(bitmask.view(np.uint32)[0, token // 32] >> np.uint32(token % 32) & 1)


def _allowed(state, token, vocab=201088):
    bitmask = constrain.allocate(1, vocab)
    state.fill(bitmask, 0)
    return _bit(bitmask, token)


def _feed(state, text):
    for token in tok.get_encoding().encode(text, allowed_special="all"):
        state.advance(token)


def test_the_budget_counts_analysis_text_across_messages_and_closes_it_once():
    final = constrain.Constraint("regex", "ok")
    prompt = harmony.encode_chat({"messages": [{"role": "user", "content": "Hi"}]})
    state = constrain.start(prompt, final, reasoning_budget=3)
    _feed(state, "<|channel|>analysis<|message|>Hi<|end|>")  # the model closes its own analysis, 1 token in
    assert not state.active and _allowed(state, tok.START)
    _feed(state, "<|start|>assistant<|channel|>analysis<|message|> there")
    assert not state.active  # 2 tokens of 3
    _feed(state, " now")  # the third: the budget is spent inside an analysis
    forced = []
    while state.matcher is None:
        assert state.active
        forced.append(next(t for t in (tok.END, tok.START, tok.CHANNEL, tok.MESSAGE,
                                       *tok.get_encoding().encode_ordinary("assistant"),
                                       *tok.get_encoding().encode_ordinary("final")) if _allowed(state, t)))
        state.advance(forced[-1])
    assert tok.get_encoding().decode(forced) == "<|end|><|start|>assistant<|channel|>final<|message|>"

    closed = constrain.start(prompt + tok.get_encoding().encode(
        "<|channel|>analysis<|message|>Hi there now<|end|>", allowed_special="all"), final, reasoning_budget=3)
    assert _allowed(closed, tok.START) and not _allowed(closed, tok.END)  # already closed: no second <|end|>


def test_a_built_in_tool_call_is_not_reasoning_for_the_budget():
    """python's code (an analysis message to=python) is neither counted against the budget nor cut by it."""
    prompt = harmony.encode_chat({"messages": [{"role": "user", "content": "Hi"}]})
    state = constrain.start(prompt, constrain.Constraint("regex", "ok"), reasoning_budget=3)
    _feed(state, "<|channel|>analysis<|message|>Compute<|end|>")  # 1 token of 3
    _feed(state, "<|start|>assistant to=python<|channel|>analysis code<|message|>print(2 ** 20 + 3 ** 7)")
    assert not state.active and state.analysis_tokens == 1  # the call's many tokens are not reasoning
    _feed(state, "<|call|>")
    assert not state.active and _allowed(state, tok.START)  # after the call: free, not driven into the final


@pytest.mark.parametrize("header", ["<|channel|>final <|constrain|>json<|message|>",
                                    "<|channel|>final<|constrain|>json<|message|>"])
def test_a_final_header_written_with_its_content_type_is_constrained_too(header):
    prompt = harmony.encode_chat({"messages": [{"role": "user", "content": "Hi"}]})
    state = constrain.start(prompt + tok.get_encoding().encode(header, allowed_special="all"),
                            constrain.Constraint("regex", "ok"))
    assert state.matcher is not None and not _allowed(state, tok.get_encoding().encode_ordinary("no")[0])
    (message,) = harmony.parse(tok.get_encoding().encode(header + "ok<|return|>", allowed_special="all"),
                               role="assistant").messages
    assert (message.channel, message.recipient, message.content_type, message.text) == (
        "final", None, "<|constrain|>json", "ok")


def test_answers_keep_the_schema_s_property_order(generator):
    schema = {"type": "object", "properties": {"zeta": {"type": "boolean"}, "alpha": {"enum": [1, 2]},
                                               "mid": {"type": "boolean"}},
              "required": ["zeta", "alpha", "mid"], "additionalProperties": False}
    outputs = generator.generate([_in_analysis()] * 3, 40, temperature=1.0, seed=[0, 1, 2],
                                 constraints=constrain.RowConstraints([constrain.Constraint("json_schema", schema)] * 3,
                                                                      reasoning_budget=[2] * 3))
    for tokens in outputs:
        assert list(json.loads(_split(tokens)[1])) == ["zeta", "alpha", "mid"]


def test_strict_tool_arguments_follow_the_parameters_and_end_with_call(generator):
    parameters = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                  "required": ["city", "days"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": parameters, "strict": True}},
             {"type": "function", "function": {"name": "loose", "parameters": parameters}}]
    strict = constrain.strict_tools(tools)
    assert list(strict) == ["forecast"]  # only the tool marked strict
    encoding = tok.get_encoding()
    prompt = harmony.encode_chat({"messages": [{"role": "user", "content": "Weather?"}], "tools": tools})
    calls = {name: [tok.CHANNEL, *encoding.encode_ordinary(f"commentary to=functions.{name} "), tok.CONSTRAIN,
                    *encoding.encode_ordinary("json"), tok.MESSAGE] for name in ("forecast", "loose")}
    calls["bare"] = [tok.CHANNEL, *encoding.encode_ordinary("commentary to=functions.forecast"), tok.MESSAGE]
    prompts = [prompt + call for call in calls.values()]
    outputs = generator.generate(prompts, 40, temperature=1.0, seed=[3, 3, 4],
                                 constraints=constrain.RowConstraints([None] * 3, [strict] * 3))
    free = generator.generate(prompts[1:2], 40, temperature=1.0, seed=[3])[0]
    for tokens in (outputs[0], outputs[2]):  # with or without <|constrain|>json in the header
        assert tokens[-1] == tok.CALL
        jsonschema.validate(json.loads(encoding.decode(tokens[:-1])), parameters)
    assert outputs[1] == free  # a tool that is not strict is left alone


def test_a_constraint_the_engine_cannot_compile_is_refused_before_anything_is_generated():
    with pytest.raises(constrain.ConstraintError, match="strng"):
        constrain.Constraint("json_schema", {"type": "object", "properties": {"a": {"type": "strng"}}})
    with pytest.raises(constrain.ConstraintError, match="uniqueItems"):
        constrain.Constraint("json_schema", {"type": "array", "uniqueItems": True})
    with pytest.raises(constrain.ConstraintError, match="regex"):
        constrain.Constraint("regex", "(unclosed")
    with pytest.raises(constrain.ConstraintError, match="expected one of"):
        constrain.Constraint("xml", "<a/>")
    with pytest.raises(constrain.ConstraintError, match=r"tools\[0\].function.parameters: .*strng"):
        constrain.strict_tools([{"type": "function", "function": {
            "name": "f", "strict": True, "parameters": {"type": "object", "properties": {"a": {"type": "strng"}}}}}])
    with pytest.raises(harmony.RecordError, match="response_format"):
        constrain.for_response_format({"type": "yaml"})
    assert constrain.for_response_format({"type": "text"}) is None
    assert constrain.for_response_format({"type": "json_object"}).kind == "json"
