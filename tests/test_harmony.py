"""Harmony rendering token for token against openai-harmony, parsing, and loss masks."""

import openai_harmony as oh
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss_jax import harmony
from gptoss_jax import tokenizer as tok

from harmony_cases import RECORDS, WEATHER, drop_finished_analysis, reference_conversation

KEEP_ANALYSIS = oh.RenderConversationConfig(auto_drop_analysis=False)


@pytest.fixture(scope="module")
def encoding():
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def test_there_are_at_least_30_varied_records():
    assert len(RECORDS) >= 30
    assert {r.get("reasoning_effort", "medium") for r in RECORDS} == {"low", "medium", "high"}


@pytest.mark.parametrize("index", range(len(RECORDS)))
def test_prompt_matches_openai_harmony(encoding, index):
    record = RECORDS[index]
    reference = drop_finished_analysis(reference_conversation(record), keep_last_turn=False)
    expected = encoding.render_conversation_for_completion(
        oh.Conversation.from_messages(reference), oh.Role.ASSISTANT, config=KEEP_ANALYSIS)
    assert harmony.encode_chat(record) == expected


@pytest.mark.parametrize("index", range(len(RECORDS)))
def test_training_render_matches_openai_harmony(encoding, index):
    record = RECORDS[index]
    reference = drop_finished_analysis(reference_conversation(record), keep_last_turn=True)
    expected = encoding.render_conversation_for_training(oh.Conversation.from_messages(reference),
                                                         config=KEEP_ANALYSIS)
    tokens, mask = harmony.encode_for_training(record)
    assert tokens == expected
    assert len(mask) == len(tokens)


@pytest.mark.parametrize("index", range(len(RECORDS)))
def test_parse_of_render_gives_back_the_messages(encoding, index):
    record = RECORDS[index]
    tokens = harmony.encode_chat(record, add_generation_prompt=False)
    expected = [m for m, keep in zip(harmony.to_messages(record), harmony._visible(harmony.to_messages(record), None),
                                     strict=True) if keep]
    result = harmony.parse(tokens)
    assert result.error is None and result.partial is None
    assert result.messages == expected
    # and openai-harmony's parser agrees on every field
    theirs = encoding.parse_messages_from_completion_tokens(tokens, None)
    assert [(m.author.role.value, m.author.name, m.channel, m.recipient, m.content_type, m.content[0].text)
            for m in theirs if m.author.role not in (oh.Role.SYSTEM, oh.Role.DEVELOPER)] == [
        (m.role, m.name, m.channel, m.recipient, m.content_type, m.text)
        for m in result.messages if m.role not in ("system", "developer")]


def test_the_last_final_ends_in_return_and_the_prompt_asks_the_assistant():
    record = RECORDS[6]
    tokens, mask = harmony.encode_for_training(record)
    assert tokens[-1] == tok.RETURN and mask[-1]
    prompt = harmony.encode_chat(record)
    assert prompt[-2:] == [tok.START, *tok.get_encoding().encode_ordinary("assistant")]


def _masked_text(tokens, mask):
    """The trained tokens as text, untrained stretches shown as '|'."""
    encoding = tok.get_encoding()
    pieces, run = [], []
    for token, trained in zip(tokens, mask, strict=True):
        if trained:
            run.append(token)
        elif run:
            pieces.append(encoding.decode(run))
            run = []
    if run:
        pieces.append(encoding.decode(run))
    return "|".join(pieces)


def test_mask_covers_exactly_what_the_model_generates():
    record = {"messages": [
        {"role": "user", "content": "Pick a number."},
        {"role": "assistant", "thinking": "Seven.", "content": "7"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "thinking": "Call.", "tool_calls": [{"function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "name": "w", "content": "sun"},
        {"role": "assistant", "thinking": "Got it.", "content": "Sunny."}]}
    tokens, mask = harmony.encode_for_training(record)
    assert _masked_text(tokens, mask) == (
        "<|channel|>analysis<|message|>Call.<|end|><|start|>assistant to=functions.w<|channel|>commentary "
        "<|constrain|>json<|message|>{}<|call|>"
        "|<|channel|>analysis<|message|>Got it.<|end|><|start|>assistant<|channel|>final<|message|>Sunny.<|return|>")
    tokens, mask = harmony.encode_for_training(record, train_on="final")
    assert _masked_text(tokens, mask) == "<|start|>assistant<|channel|>final<|message|>Sunny.<|return|>"
    tokens, mask = harmony.encode_for_training(record, train_on="all_assistant_turns")
    assert _masked_text(tokens, mask).startswith("<|channel|>final<|message|>7<|end|>|<|channel|>analysis")
    assert "Seven." not in tok.get_encoding().decode(tokens)  # the finished first turn lost its analysis


def test_streaming_parser_yields_deltas_and_survives_split_utf8():
    text = "héllo 😺 wörld"
    tokens = [*tok.get_encoding().encode_ordinary("<|channel|>final"), tok.MESSAGE]
    tokens = [tok.CHANNEL, *tok.get_encoding().encode_ordinary("final"), tok.MESSAGE,
              *tok.get_encoding().encode_ordinary(text)]
    parser = harmony.StreamParser(role="assistant")
    deltas = []
    for token in tokens:
        parser.feed(token)
        deltas.append(parser.delta)
    assert "".join(deltas) == text
    assert parser.current == harmony.Message("assistant", text, "final")
    result = parser.result()
    assert result.partial == harmony.Message("assistant", text, "final") and result.messages == []
    parser.feed(tok.RETURN)
    assert parser.result().messages == [harmony.Message("assistant", text, "final")]
    assert parser.result().stop_token == tok.RETURN


def test_malformed_output_is_reported_and_parsing_resumes():
    encoding = tok.get_encoding()
    good = harmony.render_message(harmony.Message("assistant", "fine", "final"))[0]
    result = harmony.parse([*encoding.encode_ordinary("garbage"), *good])
    assert result.error.startswith("token 0: expected <|start|>")
    assert result.messages == [harmony.Message("assistant", "fine", "final")]
    result = harmony.parse([tok.START, *encoding.encode_ordinary("assistant to=a b c"), tok.MESSAGE, tok.END])
    assert "unexpected text in the message header" in result.error
    result = harmony.parse([tok.START, *encoding.encode_ordinary("assistant"), tok.CHANNEL, tok.MESSAGE])
    assert result.error.endswith("<|channel|> without a channel name")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(sorted(harmony.STOP_TOKENS | {tok.START, tok.MESSAGE, tok.CHANNEL,
                                                                        tok.CONSTRAIN})),
                          st.integers(0, 201087)), max_size=60),
       st.sampled_from([None, "assistant"]))
def test_parser_never_raises_on_arbitrary_tokens(tokens, role):
    parser = harmony.StreamParser(role)
    for token in tokens:
        parser.feed(token)
        assert isinstance(parser.delta, str)
    result = parser.result()
    assert all(isinstance(m, harmony.Message) for m in result.messages)


@pytest.mark.parametrize("record, message", [
    ({"messages": "hi"}, "a record is an object with a 'messages' list"),
    ({"messages": [], "reasoning_effort": "max"}, "reasoning_effort: expected one of"),
    ({"messages": [], "current_date": "25/11/2026"}, "current_date: expected YYYY-MM-DD"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\]\.role: expected one of"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\]\.content: expected a string"),
    ({"messages": [{"role": "user", "content": "a", "mood": "x"}]}, r"messages\[0\]: unknown field 'mood'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     r"messages\[1\]: system messages must come before the conversation"),
    ({"messages": [{"role": "tool", "content": "a"}]}, r"messages\[0\]: a tool result needs a 'name'"),
    ({"messages": [], "tools": [{"type": "function"}]}, r"tools\[0\]: expected"),
    ({"messages": [], "builtin_tools": ["shell"]}, r"builtin_tools: expected a list of \('browser', 'python'\)"),
])
def test_bad_records_name_the_field(record, message):
    with pytest.raises(harmony.RecordError, match=message):
        harmony.encode_chat(record)


def test_training_needs_an_assistant_message():
    with pytest.raises(harmony.RecordError, match="no assistant message to train on"):
        harmony.encode_for_training({"messages": [{"role": "user", "content": "hi"}]})


SHOPPING = {"type": "json_schema", "json_schema": {
    "name": "shopping_list", "description": "What to buy.\nOne entry per item.",
    "schema": {"properties": {"items": {"type": "array", "description": "entries", "items": {"type": "string"}}},
               "type": "object"}}}


@pytest.mark.parametrize("instructions, tools", [(None, False), ("Be brief.", False), ("Be brief.", True)])
def test_a_json_schema_response_format_ends_the_developer_message(encoding, instructions, tools):
    """The harmony format documents `# Response Formats` / `## NAME` / `// DESCRIPTION` / the schema at the end of
    the developer message; openai-harmony has no API for it, so the reference is its render of the same record
    without the format, with the section added before the developer message's <|end|>."""
    record = {"messages": ([{"role": "developer", "content": instructions}] if instructions else [])
              + [{"role": "user", "content": "I need coffee and eggs."}],
              "tools": [WEATHER] if tools else [], "reasoning_effort": "high"}
    plain = tok.get_encoding().decode(encoding.render_conversation_for_completion(
        oh.Conversation.from_messages(reference_conversation(record)), oh.Role.ASSISTANT))
    section = ('# Response Formats\n\n## shopping_list\n\n// What to buy.\n// One entry per item.\n'
               '{"properties":{"items":{"type":"array","description":"entries","items":{"type":"string"}}},'
               '"type":"object"}')
    if instructions or tools:
        head, tail = plain.split("<|end|><|start|>user", 1)
        expected = f"{head}\n\n{section}<|end|><|start|>user{tail}"
    else:
        head, tail = plain.split("<|start|>user", 1)
        expected = f"{head}<|start|>developer<|message|>{section}<|end|><|start|>user{tail}"
    tokens = harmony.encode_chat({**record, "response_format": SHOPPING})
    assert tok.get_encoding().decode(tokens) == expected
    assert tokens == tok.get_encoding().encode(expected, allowed_special="all")
    developer = [m for m in harmony.parse(tokens).messages if m.role == "developer"]
    assert developer[0].text.endswith(section)  # and it parses back
    for plain_format in ({"type": "text"}, {"type": "json_object"}):  # formats without a schema add nothing
        assert harmony.encode_chat({**record, "response_format": plain_format}) == harmony.encode_chat(record)


@pytest.mark.parametrize("response_format, message", [
    ({"type": "yaml"}, r"response_format: expected \{'type': 'text' \| 'json_object' \| 'json_schema'"),
    ({"type": "json_schema"}, r"response_format.json_schema: expected"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "name: expected a name without spaces"),
])
def test_bad_response_formats_name_the_field(response_format, message):
    with pytest.raises(harmony.RecordError, match=message):
        harmony.encode_chat({"messages": [{"role": "user", "content": "x"}], "response_format": response_format})
