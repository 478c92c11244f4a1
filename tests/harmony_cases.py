"""Conversation records for the harmony parity tests, and the openai-harmony rendering of each one.

`reference_conversation` is the executable statement of how a record maps onto harmony messages, written
with openai-harmony's own builders (system and developer contents included), independently of
gptoss_jax.harmony.
"""

from __future__ import annotations

import json

import openai_harmony as oh

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the current weather in a place.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                "days": {"type": "integer", "description": "Days of forecast", "default": 1},
            },
            "required": ["location"],
        },
    },
}

SEARCH = {
    "type": "function",
    "function": {
        "name": "search_flights",
        "description": "Search flights.\nReturns at most `limit` offers.",
        "parameters": {
            "type": "object",
            "description": "Search criteria",
            "properties": {
                "route": {
                    "type": "object",
                    "description": "Where from and to",
                    "properties": {
                        "from": {"type": "string", "title": "Origin", "examples": ["CDG", "JFK"]},
                        "to": {"type": "string"},
                    },
                    "required": ["from", "to"],
                },
                "passengers": {"type": "array", "items": {"type": "object", "properties": {
                    "age": {"type": "number"}, "name": {"type": "string", "nullable": True}}}},
                "cabin": {"oneOf": [{"type": "string", "enum": ["economy", "business"], "description": "a class"},
                                    {"type": "null", "description": "any class"}],
                          "description": "Cabin class", "default": "economy"},
                "flexible": {"type": "boolean", "default": False},
                "tags": {"type": ["string", "integer"]},
                "limit": {"type": "number", "default": 10},
                "extra": {},
                "when": {"type": "array"},
            },
            "required": ["route"],
        },
    },
}

CALCULATOR = {"type": "function", "function": {"name": "calculate", "description": "",
                                               "parameters": {"type": "object", "properties": {
                                                   "expression": {"type": "string"}}}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time now, as ISO 8601."}}
UNION = {"type": "function", "function": {"name": "lookup", "description": "Look up a key.", "parameters": {
    "oneOf": [{"type": "object", "properties": {"id": {"type": "integer"}}},
              {"type": "string", "enum": ["all"], "default": "all", "description": "everything"}]}}}


def _tool_loop(arguments, effort="medium"):
    return {
        "reasoning_effort": effort,
        "current_date": "2025-08-05",
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "What's the weather in Tokyo and Paris?"},
            {"role": "assistant", "thinking": "I should call get_weather twice.",
             "tool_calls": [{"id": "call_1", "type": "function",
                             "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
            {"role": "assistant", "thinking": "Now Paris.", "content": "Checking Paris next.",
             "tool_calls": [{"id": "call_2", "function": {"name": "get_weather",
                                                          "arguments": {"location": "Paris, France"}}}]},
            {"role": "tool", "name": "get_weather", "content": '{"temperature": 17}'},
            {"role": "assistant", "thinking": "Both known.", "content": "Tokyo 21°C and clear; Paris 17°C."},
        ],
    }


RECORDS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"reasoning_effort": "low", "messages": [{"role": "user", "content": "2+2?"},
                                             {"role": "assistant", "thinking": "Easy.", "content": "4"}]},
    {"reasoning_effort": "high", "current_date": "2024-12-31",
     "messages": [{"role": "user", "content": "Prove that there are infinitely many primes."},
                  {"role": "assistant", "thinking": "Euclid: assume finitely many, multiply, add one...",
                   "content": "Suppose p1…pn are all primes; p1·…·pn + 1 has a prime factor not among them."}]},
    {"reasoning_effort": "medium", "current_date": "2025-01-01",
     "messages": [{"role": "system", "content": "You are a terse assistant."},
                  {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "thinking": "Paris.", "content": "Paris."}]},
    {"messages": [{"role": "developer", "content": "Always answer in French.\nUse short sentences."},
                  {"role": "user", "content": "How are you?"},
                  {"role": "assistant", "thinking": "Answer in French.", "content": "Très bien, merci !"}]},
    {"messages": [{"role": "system", "content": "Be helpful."}, {"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
    # multi-turn: the first turn's analysis is dropped, the last one's kept (training) or dropped (prompt)
    {"messages": [{"role": "user", "content": "Pick a number."},
                  {"role": "assistant", "thinking": "Seven is nice.", "content": "7"},
                  {"role": "user", "content": "Double it."},
                  {"role": "assistant", "thinking": "7*2=14.", "content": "14"}]},
    {"reasoning_effort": "high", "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "thinking": "t1", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "thinking": "t2", "content": "d"},
        {"role": "user", "content": "e"}, {"role": "assistant", "thinking": "t3", "content": "f"}]},
    # a prompt whose last turn is in progress: its analysis stays
    {"messages": [{"role": "user", "content": "Think first."},
                  {"role": "assistant", "thinking": "Still thinking..."}]},
    _tool_loop('{"location": "Tokyo, Japan"}'),
    _tool_loop({"location": "Tokyo, Japan", "unit": "celsius"}, effort="high"),
    _tool_loop('{"location":"Tokyo"}', effort="low"),
    # tool loop in progress (ends on a tool result)
    {"tools": [WEATHER, CALCULATOR], "current_date": "2025-03-03", "messages": [
        {"role": "user", "content": "Weather in Oslo times two?"},
        {"role": "assistant", "thinking": "Call the weather tool.",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"location": "Oslo"}'}}]},
        {"role": "tool", "name": "get_weather", "content": "-3"},
        {"role": "assistant", "thinking": "Now multiply.",
         "tool_calls": [{"function": {"name": "calculate", "arguments": '{"expression": "-3*2"}'}}]},
        {"role": "tool", "name": "calculate", "content": "-6"}]},
    {"tools": [SEARCH], "messages": [{"role": "user", "content": "Flights CDG to JFK?"},
                                     {"role": "assistant", "content": "Let me search."}]},
    {"tools": [SEARCH, WEATHER, CLOCK], "reasoning_effort": "low",
     "messages": [{"role": "developer", "content": "Only use tools when needed."},
                  {"role": "user", "content": "What time is it?"},
                  {"role": "assistant", "thinking": "Use now().",
                   "tool_calls": [{"function": {"name": "now", "arguments": "{}"}}]},
                  {"role": "tool", "name": "now", "content": "2025-08-05T10:00:00Z"},
                  {"role": "assistant", "content": "10:00 UTC."}]},
    {"tools": [UNION, CLOCK], "messages": [{"role": "user", "content": "Look up everything."},
                                           {"role": "assistant", "content": "Sure."}]},
    # the built-in tools: python and browser calls on the analysis channel, their results, then a final answer
    {"builtin_tools": ["python"], "reasoning_effort": "high", "messages": [
        {"role": "user", "content": "What is 2**20?"},
        {"role": "assistant", "channel": "analysis", "content": "Compute it."},
        {"role": "assistant", "channel": "analysis", "recipient": "python", "content_type": "code",
         "content": "print(2**20)"},
        {"role": "tool", "name": "python", "channel": "analysis", "recipient": "assistant", "content": "1048576\n"},
        {"role": "assistant", "content": "1048576"}]},
    # a built-in tool's result that names no recipient: it is the assistant's, as the reference's tools send it
    {"builtin_tools": ["python"], "messages": [
        {"role": "user", "content": "What is 3**3?"},
        {"role": "assistant", "channel": "analysis", "recipient": "python", "content_type": "code",
         "content": "print(3**3)"},
        {"role": "tool", "name": "python", "channel": "analysis", "content": "27\n"},
        {"role": "assistant", "content": "27"}]},
    {"builtin_tools": ["browser"], "current_date": "2025-06-28", "messages": [
        {"role": "user", "content": "Who wrote Dune?"},
        {"role": "assistant", "channel": "analysis", "recipient": "browser.search", "content_type": "json",
         "content": '{"query": "Dune novel author", "topn": 3}'},
        {"role": "tool", "name": "browser.search", "channel": "analysis", "recipient": "assistant",
         "content": "[0] Dune (novel) - Wikipedia\nL0: Dune is a 1965 novel by Frank Herbert."},
        {"role": "assistant", "channel": "analysis", "recipient": "browser.open", "content_type": "json",
         "content": '{"id": 0, "cursor": 0}'},
        {"role": "tool", "name": "browser.open", "channel": "analysis", "recipient": "assistant",
         "content": "[1] Dune (novel)\nL0: Frank Herbert wrote it."},
        {"role": "assistant", "content": "Frank Herbert 【1†L0】."}]},
    {"builtin_tools": ["python", "browser"], "tools": [WEATHER], "reasoning_effort": "low", "messages": [
        {"role": "developer", "content": "Prefer tools."},
        {"role": "user", "content": "Weather in Oslo, and its square root?"},
        {"role": "assistant", "thinking": "Weather first.",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"location": "Oslo"}'}}]},
        {"role": "tool", "name": "get_weather", "content": "16"},
        {"role": "assistant", "channel": "analysis", "recipient": "python", "content_type": "code",
         "content": "import math; math.sqrt(16)"},
        {"role": "tool", "name": "python", "channel": "analysis", "recipient": "assistant", "content": "4.0"}]},
    {"tools": [CALCULATOR], "messages": [{"role": "user", "content": "1/0?"},
                                         {"role": "assistant", "thinking": "Undefined.",
                                          "content": "Undefined."}]},
    # unicode and emoji
    {"messages": [{"role": "user", "content": "Translate 🐱 into 日本語 and Ελληνικά"},
                  {"role": "assistant", "thinking": "猫 and γάτα 😺", "content": "猫 / γάτα"}]},
    {"messages": [{"role": "user", "content": "Écris « bonjour » en arabe : مرحبا؟ 👋🏽"},
                  {"role": "assistant", "content": "مرحبا 👋🏽"}]},
    # empty content
    {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]},
    {"messages": [{"role": "user", "content": "Say nothing."},
                  {"role": "assistant", "thinking": "Nothing it is.", "content": ""}]},
    {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "ok"}]},
    # OpenAI content parts
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "part one, "},
                                               {"type": "text", "text": "part two"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "got both"}]}]},
    # harmony-native messages
    {"messages": [{"role": "user", "content": "Plan then answer."},
                  {"role": "assistant", "channel": "analysis", "content": "Plan: answer."},
                  {"role": "assistant", "channel": "commentary", "content": "Working on it."},
                  {"role": "assistant", "channel": "final", "content": "Answer."}]},
    {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "channel": "commentary", "recipient": "functions.get_weather",
         "content_type": "<|constrain|>json", "content": '{"location": "Rome"}'},
        {"role": "tool", "name": "functions.get_weather", "channel": "commentary", "recipient": "assistant",
         "content": "sunny"},
        {"role": "assistant", "channel": "final", "content": "Sunny in Rome."}]},
    # whitespace and special-looking text stays ordinary text
    {"messages": [{"role": "user", "content": "  leading and trailing  \n\n"},
                  {"role": "assistant", "content": "Text with <|end|> and <|start|> inside."}]},
    {"messages": [{"role": "user", "content": "Code?"},
                  {"role": "assistant", "thinking": "Write code.",
                   "content": "```python\ndef f(x):\n    return x ** 2\n```"}]},
    {"reasoning_effort": "low", "current_date": "2026-02-28",
     "messages": [{"role": "user", "content": "Long " + "word " * 200},
                  {"role": "assistant", "content": "Short."}]},
    {"reasoning_effort": "medium", "current_date": "2025-11-25", "tools": [WEATHER], "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "thinking": "Greet.", "content": "Hello!"},
        {"role": "user", "content": "Weather in Lima?"},
        {"role": "assistant", "thinking": "Call tool.",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"location": "Lima"}'}}]},
        {"role": "tool", "name": "get_weather", "content": "22C"},
        {"role": "assistant", "content": "22°C in Lima."}]},
    {"messages": [{"role": "user", "content": "Two thoughts?"},
                  {"role": "assistant", "thinking": "First thought."},
                  {"role": "assistant", "thinking": "Second thought.", "content": "Done."}]},
    {"reasoning_effort": "high", "current_date": "2025-06-30", "tools": [SEARCH, UNION],
     "messages": [{"role": "system", "content": "# Rules\n- be kind\n- be exact"},
                  {"role": "user", "content": "Hello 👋"},
                  {"role": "assistant", "thinking": "Say hi.", "content": "Hi! 😊"}]},
]


def _content(message) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(part["text"] for part in content)
    return content or ""


def reference_conversation(record) -> list[oh.Message]:
    """The record as openai-harmony messages, every analysis included."""
    effort = {"low": oh.ReasoningEffort.LOW, "medium": oh.ReasoningEffort.MEDIUM, "high": oh.ReasoningEffort.HIGH}[
        record.get("reasoning_effort", "medium")]
    system = oh.SystemContent.new().with_reasoning_effort(effort)
    if record.get("current_date"):
        system = system.with_conversation_start_date(record["current_date"])
    if "python" in record.get("builtin_tools", []):
        system = system.with_python_tool()
    if "browser" in record.get("builtin_tools", []):
        system = system.with_browser_tool()
    out = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    messages = record["messages"]
    instructions = []
    while messages and messages[0]["role"] in ("system", "developer"):
        instructions.append(_content(messages[0]))
        messages = messages[1:]
    tools = [t["function"] for t in record.get("tools", [])]
    if instructions or tools:
        developer = oh.DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions("\n\n".join(instructions))
        if tools:
            developer = developer.with_function_tools([
                oh.ToolDescription.new(t["name"], t.get("description", ""), parameters=t.get("parameters"))
                for t in tools])
        out.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    ids = {}
    for message in messages:
        role, text = message["role"], _content(message)
        if "channel" in message:
            author = (oh.Author.new(oh.Role.TOOL, message["name"]) if role == "tool"
                      else oh.Author(role=oh.Role(role)))
            m = oh.Message.from_author_and_content(author, text).with_channel(message["channel"])
            # the reference's tools address every result to the assistant (`.with_recipient("assistant")`)
            recipient = message.get("recipient") or ("assistant" if role == "tool" else None)
            if recipient:
                m = m.with_recipient(recipient)
            if message.get("content_type"):
                m = m.with_content_type(message["content_type"])
            out.append(m)
        elif role == "user":
            out.append(oh.Message.from_role_and_content(oh.Role.USER, text))
        elif role == "tool":
            name = message.get("name") or ids[message["tool_call_id"]]
            out.append(oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, f"functions.{name}"), text)
                       .with_channel("commentary").with_recipient("assistant"))
        else:
            calls = message.get("tool_calls", [])
            if message.get("thinking"):
                out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, message["thinking"])
                           .with_channel("analysis"))
            if text or not (calls or message.get("thinking")):
                out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, text)
                           .with_channel("commentary" if calls else "final"))
            for call in calls:
                function = call["function"]
                arguments = function["arguments"]
                if not isinstance(arguments, str):
                    arguments = json.dumps(arguments, ensure_ascii=False)
                ids[call.get("id")] = function["name"]
                out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, arguments)
                           .with_channel("commentary").with_recipient(f"functions.{function['name']}")
                           .with_content_type("<|constrain|>json"))
    return out


def drop_finished_analysis(messages: list[oh.Message], keep_last_turn: bool) -> list[oh.Message]:
    """The harmony spec: analysis goes from every turn that ended on final (but the last turn, if kept)."""
    turns, turn = [], 0
    for m in messages:
        turn += m.author.role == oh.Role.USER
        turns.append(turn)
    last_assistant = {t: m for m, t in zip(messages, turns, strict=True) if m.author.role == oh.Role.ASSISTANT}
    finished = {t for t, m in last_assistant.items() if m.channel == "final"}
    if keep_last_turn:
        finished.discard(turns[-1])
    return [m for m, t in zip(messages, turns, strict=True) if not (m.channel == "analysis" and t in finished)]
