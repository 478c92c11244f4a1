"""Harmony, the chat format gpt-oss is trained on: rendering conversations to tokens (with loss masks for
training) and parsing generated tokens back into messages, token for token as the `openai-harmony` package does.

A conversation arrives as a *record*, the JSONL shape of OpenAI chat data and HF's Multilingual-Thinking:

    {"messages": [...], "tools": [{"type": "function", "function": {"name", "description", "parameters"}}],
     "reasoning_effort": "low" | "medium" | "high", "current_date": "YYYY-MM-DD",
     "response_format": {"type": "json_schema", "json_schema": {"name", "description", "schema"}}}

Messages: `system` / `developer` (leading; their texts become the developer message's `# Instructions`),
`user`, `assistant` (`thinking` -> analysis channel, `content` -> final channel, or a commentary preamble when
the message also has `tool_calls`; each tool call -> a commentary message to `functions.NAME` with
`<|constrain|>json`, ended by `<|call|>`), and `tool` (a result, named by `name` or by its `tool_call_id`).
Harmony-native messages, with an explicit `channel` (and optionally `recipient`, `content_type`), are taken as
they are, except that a `tool` one without a `recipient` is addressed to the assistant (`python to=assistant`),
as the reference's tools and the agent loop send results. The system message is generated: identity, knowledge
cutoff, current date (when the record has one), reasoning effort (default medium), the valid channels, and the
line routing function calls to commentary when the record has tools. A `json_schema` response format becomes the
developer message's `# Response Formats` section (`## NAME`, `// DESCRIPTION`, the schema as compact JSON),
after the instructions and tools, as the harmony format documents; `json_object` and `text` formats add nothing
(only the sampler can hold the model to them).

Chain of thought: the analysis of every assistant turn that ended on the final channel is dropped, except the
analysis of the turn being trained; the turn in progress (no final yet, e.g. a tool-call loop) keeps its
analysis. For example, for user A, assistant (analysis a1, final f1), user B, assistant (analysis a2, tool call
c2), tool result r2: the prompt holds A, f1, B, a2, c2, r2 — a1 is dropped, a2 is kept. A training render of
user A, assistant (a1, f1), user B, assistant (a2, f2) holds A, f1, B, a2, f2 and trains on a2 and f2.
(openai-harmony 0.0.8 drops only the analysis before the first final, and in training also the trained turn's
unless `auto_drop_analysis=False`; this module follows the harmony spec.)
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime
import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gptoss_jax import tokenizer as tok

ROLES = ("system", "developer", "user", "assistant", "tool")
EFFORTS = ("low", "medium", "high")
TRAIN_ON = ("assistant", "final", "all_assistant_turns")
MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
CHANNELS = ("analysis", "commentary", "final")
JSON_CONTENT_TYPE = "<|constrain|>json"
STOP_TOKENS = frozenset({tok.END, tok.RETURN, tok.CALL})
HEADER_CUT = "output ended inside a message header"  # the parse error of an output cut off in a header


class RecordError(ValueError):
    """A conversation record that does not describe a harmony conversation; the message says where."""


@dataclasses.dataclass(frozen=True)
class Message:
    """One harmony message. `role` is one of ROLES; tool messages carry their author in `name`
    (e.g. "functions.get_weather")."""

    role: str
    text: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    name: str | None = None


# ---- record -> harmony messages --------------------------------------------------------------------------------


def to_messages(record: Mapping[str, Any]) -> list[Message]:
    """All harmony messages of a record, nothing dropped: system, developer (if any), then the conversation."""
    if not isinstance(record, Mapping) or not isinstance(record.get("messages"), list):
        raise RecordError("a record is an object with a 'messages' list")
    effort = record.get("reasoning_effort") or "medium"
    if effort not in EFFORTS:
        raise RecordError(f"reasoning_effort: expected one of {EFFORTS}, got {effort!r}")
    date = record.get("current_date")
    if date is not None:
        try:
            datetime.date.fromisoformat(date)
        except (TypeError, ValueError):
            raise RecordError(f"current_date: expected YYYY-MM-DD, got {date!r}") from None
    tools = [function_tool(i, t) for i, t in enumerate(record.get("tools") or [])]
    builtin = record.get("builtin_tools") or []
    if not isinstance(builtin, list | tuple) or set(builtin) - set(BUILTIN_TOOLS):
        raise RecordError(f"builtin_tools: expected a list of {BUILTIN_TOOLS}, got {builtin!r}")
    schema_format = response_format(record.get("response_format"))

    conversation = record["messages"]
    instructions = []
    while conversation and isinstance(conversation[0], Mapping) and conversation[0].get("role") in ("system",
                                                                                                     "developer"):
        instructions.append(_text(conversation[0], f"messages[{len(instructions)}]"))
        conversation = conversation[1:]
    messages = [Message("system", system_text(effort, date, has_functions=bool(tools), builtin_tools=builtin))]
    if instructions or tools or schema_format:
        messages.append(Message("developer", developer_text("\n\n".join(instructions) if instructions else None,
                                                            tools, schema_format)))
    call_names: dict[str, str] = {}
    for index, message in enumerate(conversation, start=len(instructions)):
        messages.extend(_convert(message, f"messages[{index}]", call_names))
    return messages


def _convert(message: Any, where: str, call_names: dict[str, str]) -> list[Message]:
    if not isinstance(message, Mapping):
        raise RecordError(f"{where}: expected an object, got {type(message).__name__}")
    unknown = set(message) - _MESSAGE_FIELDS
    if unknown:
        raise RecordError(f"{where}: unknown field {sorted(unknown)[0]!r} (known: {sorted(_MESSAGE_FIELDS)})")
    role = message.get("role")
    if role not in ROLES:
        raise RecordError(f"{where}.role: expected one of {ROLES}, got {role!r}")
    if role in ("system", "developer"):
        raise RecordError(f"{where}: {role} messages must come before the conversation (harmony has one "
                          "developer message, at the top)")
    if "channel" in message:  # harmony-native; a tool's result goes to the assistant unless it says otherwise
        recipient = message.get("recipient", "assistant" if role == "tool" else None)
        return [Message(role, _text(message, where), message["channel"], recipient, message.get("content_type"),
                        message.get("name"))]
    if role != "assistant" and message.get("thinking"):
        raise RecordError(f"{where}.thinking: only assistant messages think")
    if role == "user":
        return [Message("user", _text(message, where))]
    if role == "tool":
        name = message.get("name") or call_names.get(message.get("tool_call_id"))
        if not name:
            raise RecordError(f"{where}: a tool result needs a 'name' (or a 'tool_call_id' of an earlier call)")
        author = name if "." in name else f"functions.{name}"
        return [Message("tool", _text(message, where), "commentary", "assistant", name=author)]

    out = []
    if message.get("thinking"):
        out.append(Message("assistant", _str(message["thinking"], f"{where}.thinking"), "analysis"))
    calls = message.get("tool_calls") or []
    text = _text(message, where)
    if text or not (calls or out):
        out.append(Message("assistant", text, "commentary" if calls else "final"))
    for number, call in enumerate(calls):
        name, arguments, call_id = _call(call, f"{where}.tool_calls[{number}]")
        if call_id is not None:
            call_names[call_id] = name
        out.append(Message("assistant", arguments, "commentary", f"functions.{name}", JSON_CONTENT_TYPE))
    return out


_MESSAGE_FIELDS = {"role", "content", "thinking", "tool_calls", "name", "tool_call_id", "channel", "recipient",
                   "content_type"}


def _text(message: Mapping, where: str) -> str:
    """`content` as text: a string, a list of {"type": "text", "text": ...} parts, or null (empty)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for number, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RecordError(f"{where}.content[{number}]: expected a {{'type': 'text', 'text': ...}} part")
            texts.append(part["text"])
        return "".join(texts)
    return _str(content, f"{where}.content")


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _call(call: Any, where: str) -> tuple[str, str, str | None]:
    """(name, JSON arguments text, id) of an OpenAI-style or flat tool call."""
    if not isinstance(call, Mapping):
        raise RecordError(f"{where}: expected an object")
    function = call.get("function", call)
    name, arguments = function.get("name"), function.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise RecordError(f"{where}: a tool call needs a function name")
    if not isinstance(arguments, str):  # a parsed object: written as compact-spaced JSON
        arguments = json.dumps(arguments, ensure_ascii=False)
    return name, arguments, call.get("id")


def function_tool(index: int, tool: Any) -> dict[str, Any]:
    """An OpenAI-style (or flat) function tool as {"name", "description", "parameters", "strict"}."""
    where = f"tools[{index}]"
    function = tool.get("function", tool) if isinstance(tool, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise RecordError(f"{where}: expected {{'type': 'function', 'function': {{'name', 'description', "
                          "'parameters'}}")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, Mapping):
        raise RecordError(f"{where}.parameters: expected a JSON schema object")
    return {"name": function["name"], "description": function.get("description") or "", "parameters": parameters,
            "strict": bool(function.get("strict"))}


# ---- system and developer texts --------------------------------------------------------------------------------


def system_text(effort: str = "medium", date: str | None = None, *, has_functions: bool = False,
                builtin_tools: Sequence[str] = ()) -> str:
    top = [MODEL_IDENTITY, f"Knowledge cutoff: {KNOWLEDGE_CUTOFF}"] + ([f"Current date: {date}"] if date else [])
    channels = f"# Valid channels: {', '.join(CHANNELS)}. Channel must be included for every message."
    if has_functions:
        channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
    sections = ["\n".join(top), f"Reasoning: {effort}"]
    if builtin_tools:  # in a fixed order, whatever the record's
        sections.append("# Tools\n\n" + "\n\n".join(_BUILTIN_SECTIONS[name]() for name in BUILTIN_TOOLS
                                                      if name in builtin_tools))
    return "\n\n".join([*sections, channels])


def response_format(value: Any, where: str = "response_format") -> dict[str, Any] | None:
    """A record's response format as {"name", "description", "schema"} when it names a JSON schema; None for
    `text`, `json_object` or none. OpenAI's shape: {"type": "json_schema", "json_schema": {"name", "description",
    "schema", "strict"}}."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind in ("text", "json_object"):
        return None
    if kind != "json_schema":
        raise RecordError(f"{where}: expected {{'type': 'text' | 'json_object' | 'json_schema', ...}}, got {value!r}")
    inner = value.get("json_schema")
    if not isinstance(inner, Mapping) or not isinstance(inner.get("schema"), Mapping):
        raise RecordError(f"{where}.json_schema: expected {{'name', 'schema': {{...}}}} with the schema an object")
    name = inner.get("name", "response")
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise RecordError(f"{where}.json_schema.name: expected a name without spaces, got {name!r}")
    description = inner.get("description") or ""
    return {"name": name, "description": _str(description, f"{where}.json_schema.description"),
            "schema": inner["schema"]}


def developer_text(instructions: str | None, tools: Sequence[Mapping[str, Any]],
                   schema_format: Mapping[str, Any] | None = None) -> str:
    sections = ["# Instructions", instructions] if instructions is not None else []
    if tools:
        sections.append("# Tools\n\n" + _namespace("functions", "", tools))
    if schema_format:
        comment = "".join(f"// {line}\n" for line in _lines(schema_format["description"]))
        schema = json.dumps(schema_format["schema"], ensure_ascii=False, separators=(",", ":"))
        sections.append(f"# Response Formats\n\n## {schema_format['name']}\n\n{comment}{schema}")
    return "\n\n".join(sections)


def _namespace(name: str, description: str, tools: Sequence[Mapping[str, Any]]) -> str:
    """A tool namespace as gpt-oss reads it: `## NAME`, its description as comments, then each function's
    description and TypeScript signature inside `namespace NAME { ... }`."""
    lines = [f"## {name}\n", *(f"// {line}" for line in _lines(description)), f"namespace {name} {{\n"]
    for tool in tools:
        lines += [f"// {line}" for line in _lines(tool["description"])]
        parameters = tool["parameters"]
        signature = "()" if parameters is None else f"(_: {typescript(parameters)})"
        lines.append(f"type {tool['name']} = {signature} => any;\n")
    lines.append(f"}} // namespace {name}")
    return "\n".join(lines)


def _browser_section() -> str:
    number, string = {"type": "number"}, {"type": "string"}
    functions = [
        {"name": "search", "description": "Searches for information related to `query` and displays `topn` results.",
         "parameters": {"type": "object", "required": ["query"], "properties": {
             "query": string, "topn": {**number, "default": 10}, "source": string}}},
        {"name": "open", "description": BROWSER_OPEN_DESCRIPTION, "parameters": {"type": "object", "properties": {
            "id": {"type": ["number", "string"], "default": -1}, "cursor": {**number, "default": -1},
            "loc": {**number, "default": -1}, "num_lines": {**number, "default": -1},
            "view_source": {"type": "boolean", "default": False}, "source": string}}},
        {"name": "find", "description": "Finds exact matches of `pattern` in the current page, or the page given by "
                                        "`cursor`.",
         "parameters": {"type": "object", "required": ["pattern"], "properties": {
             "pattern": string, "cursor": {**number, "default": -1}}}},
    ]
    return _namespace("browser", BROWSER_DESCRIPTION, functions)


def _python_section() -> str:
    return f"## python\n\n{PYTHON_DESCRIPTION}"


# The built-in tools' descriptions, word for word as gpt-oss was trained with them (openai-harmony renders the same).
BROWSER_DESCRIPTION = """Tool for browsing.
The `cursor` appears in brackets before each browsing display: `[{cursor}]`.
Cite information from the tool using the following format:
`【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.
Do not quote more than 10 words directly from the tool output.
sources=web (default: web)"""
BROWSER_OPEN_DESCRIPTION = """Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, \
showing `num_lines` lines.
Valid link ids are displayed with the formatting: `【{id}†.*】`.
If `cursor` is not provided, the most recent page is implied.
If `id` is a string, it is treated as a fully qualified URL associated with `source`.
If `loc` is not provided, the viewport will be positioned at the beginning of the document or centered on the most \
relevant passage, if available.
Use this function without `id` to scroll to a new location of an opened page."""
PYTHON_DESCRIPTION = """Use this tool to execute Python code in your chain of thought. The code will not be shown \
to the user. This tool should be used for internal reasoning, but not for code that is intended to be visible to \
the user (e.g. when creating plots, tables, or files).

When you send a message containing Python code to python, it will be executed in a stateful Jupyter notebook \
environment. python will respond with the output of the execution or time out after 120.0 seconds. The drive at \
'/mnt/data' can be used to save and persist user files. Internet access for this session is UNKNOWN. Depends on \
the cluster."""
BUILTIN_TOOLS = ("browser", "python")  # in the order the system message lists them
_BUILTIN_SECTIONS = {"browser": _browser_section, "python": _python_section}


def _lines(text: str) -> list[str]:
    """Lines split at '\\n' (a trailing '\\r' dropped, no empty last line) — Rust's `str::lines`."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines


def typescript(schema: Any, indent: str = "") -> str:
    """A JSON schema as the TypeScript-like type harmony shows the model (descriptions, defaults and examples
    as comments, optional properties marked `?`)."""
    if not isinstance(schema, Mapping):
        return "any"
    if isinstance(schema.get("oneOf"), list):
        return "".join(
            f"\n{indent} | {_variant(v, indent + '   ')}{_trailing(v, skip_description=False, bare_enum=False)}"
            for v in schema["oneOf"]
        )
    kind = schema.get("type")
    if isinstance(kind, list):
        names = [{"integer": "number"}.get(k, k) for k in kind if isinstance(k, str)]
        if names:
            return " | ".join(names)
        kind = None
    if kind == "object":
        return _object(schema, indent)
    if kind == "string":
        values = [f'"{v}"' for v in schema.get("enum") or [] if isinstance(v, str)]
        return " | ".join(values) if values else "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        return f"{typescript(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
    return "any"


def _object(schema: Mapping, indent: str) -> str:
    out = f"{indent}// {schema['description']}\n" if isinstance(schema.get("description"), str) else ""
    out += "{\n"
    properties = schema.get("properties")
    required = {r for r in schema.get("required") or [] if isinstance(r, str)}
    for key, value in (properties.items() if isinstance(properties, Mapping) else []):
        value = value if isinstance(value, Mapping) else {}
        optional = "" if key in required else "?"
        if isinstance(value.get("title"), str):
            out += f"{indent}// {value['title']}\n{indent}//\n"
        description = value.get("description") if isinstance(value.get("description"), str) else None
        if description is not None and "oneOf" not in value:
            out += f"{indent}// {description}\n"
        examples = value.get("examples")
        if isinstance(examples, list) and examples:
            out += f"{indent}// Examples:\n"
            out += "".join(f'{indent}// - "{e}"\n' for e in examples if isinstance(e, str))
        variants = value.get("oneOf")
        if isinstance(variants, list):
            first = variants[0] if variants and isinstance(variants[0], Mapping) else {}
            described_above = description is not None and first.get("description") != description
            if described_above:
                out += f"{indent}// {description}\n"
            if "default" in value:
                out += f"{indent}// {_default(value)}\n"
            out += f"{indent}{key}{optional}:\n"
            for number, variant in enumerate(variants):
                trailing = _trailing(variant, skip_description=number == 0 and described_above, parent=description)
                out += f"{indent} | {_variant(variant, indent + '   ')}{trailing}\n"
            out += f"{indent},\n"
            continue
        out += f"{indent}{key}{optional}: {_nullable(value, typescript(value, indent + '    '))},"
        if "default" in value and "oneOf" not in value:
            out += f" // {_default(value)}"
        out += "\n"
    return out + f"{indent}}}"


def _variant(variant: Any, indent: str) -> str:
    return _nullable(variant, typescript(variant, indent))


def _nullable(schema: Any, rendered: str) -> str:
    nullable = isinstance(schema, Mapping) and schema.get("nullable") is True
    return f"{rendered} | null" if nullable and "null" not in rendered else rendered


def _trailing(variant: Any, *, skip_description: bool, parent: str | None = None, bare_enum: bool = True) -> str:
    """A oneOf variant's trailing comment: its description (unless it repeats the property's) and default."""
    if not isinstance(variant, Mapping):
        return ""
    comments = []
    description = variant.get("description")
    if not skip_description and isinstance(description, str) and description != parent:
        comments.append(description)
    if "default" in variant:
        comments.append(_default(variant, bare_enum=bare_enum))
    return f" // {' '.join(comments)}" if comments else ""


def _default(schema: Mapping, *, bare_enum: bool = True) -> str:
    """`default: ...` — strings quoted, except an enum's (openai-harmony quotes those too in a top-level oneOf)."""
    value = schema["default"]
    is_enum = isinstance(schema.get("enum"), list) and bool(schema["enum"])
    if isinstance(value, str):
        return f"default: {value}" if is_enum and bare_enum else f'default: "{value}"'
    return f"default: {json.dumps(value, separators=(',', ':'), ensure_ascii=False)}"


# ---- rendering -------------------------------------------------------------------------------------------------


@functools.cache
def _encode(text: str) -> tuple[int, ...]:
    """Ordinary (no special tokens) encoding of a header piece; cached, since headers repeat."""
    return tuple(tok.get_encoding().encode_ordinary(text))


def render_message(message: Message, *, end: int | None = None) -> tuple[list[int], int]:
    """(tokens, length of the `<|start|>` + author prefix). `end` overrides the end token."""
    tokens = [tok.START, *_encode(message.name if message.role == "tool" else message.role)]
    prefix = len(tokens)
    if message.recipient is not None and message.recipient != "all":
        tokens += _encode(f" to={message.recipient}")
    if message.channel is not None:
        tokens += [tok.CHANNEL, *_encode(message.channel)]
    if message.content_type is not None:
        if message.content_type.startswith("<|constrain|>"):
            rest = message.content_type.removeprefix("<|constrain|>")
            tokens += [*_encode(" "), tok.CONSTRAIN, *(_encode(rest) if rest else ())]
        else:
            tokens += _encode(f" {message.content_type}")
    tokens.append(tok.MESSAGE)
    tokens += tok.get_encoding().encode_ordinary(message.text)
    if end is None:
        end = tok.CALL if message.role == "assistant" and message.recipient is not None else tok.END
    tokens.append(end)
    return tokens, prefix


def _turns(messages: Sequence[Message]) -> list[int]:
    """The turn number of each message: a user message opens a turn (system and developer are turn 0)."""
    turns, turn = [], 0
    for message in messages:
        turn += message.role == "user"
        turns.append(turn)
    return turns


def _visible(messages: Sequence[Message], keep_turn: int | None) -> list[bool]:
    """Which messages stay: analysis is dropped from turns whose last assistant message is final, except `keep_turn`
    (built-in tool calls and their results are on the analysis channel: they go with it)."""
    turns = _turns(messages)
    last_assistant = {}
    for message, turn in zip(messages, turns, strict=True):
        if message.role == "assistant":
            last_assistant[turn] = message
    finished = {turn for turn, message in last_assistant.items() if message.channel == "final"}
    return [
        not (m.channel == "analysis" and t in finished and t != keep_turn)
        for m, t in zip(messages, turns, strict=True)
    ]


@functools.cache
def chat_template() -> str:
    """This module's rendering as a Jinja chat template (harmony.jinja, with the model identity and the built-in
    tools' sections set in it), for exports: transformers' `apply_chat_template(messages, tools=...,
    reasoning_effort=..., current_date=..., builtin_tools=..., response_format=...)` gives `encode_chat` of the
    record those make."""
    from pathlib import Path

    constants = {"model_identity": MODEL_IDENTITY, "knowledge_cutoff": KNOWLEDGE_CUTOFF,
                 "browser_section": _browser_section(), "python_section": _python_section()}
    # JSON strings are Jinja string literals (ASCII, escapes included)
    sets = "".join(f"{{%- set {name} = {json.dumps(value)} -%}}\n" for name, value in constants.items())
    return sets + Path(__file__).with_name("harmony.jinja").read_text(encoding="utf-8")


def encode_chat(record: Mapping[str, Any], *, add_generation_prompt: bool = True) -> list[int]:
    """The record rendered as a prompt: `<|start|>assistant` appended (when asked) for the model to continue."""
    messages = to_messages(record)
    tokens = []
    for message, visible in zip(messages, _visible(messages, keep_turn=None), strict=True):
        if visible:
            tokens += render_message(message)[0]
    if add_generation_prompt:
        tokens += [tok.START, *_encode("assistant")]
    return tokens


def encode_for_training(record: Mapping[str, Any], *, train_on: str = "assistant") -> tuple[list[int], list[bool]]:
    """(tokens, loss mask) of a record. The last assistant final ends in `<|return|>`.

    The mask marks exactly the tokens the model would generate in the trained messages: all of each message
    but its `<|start|>assistant` prefix, which is also trained when the message continues the assistant's own
    output (follows an assistant message ended by `<|end|>`). `train_on`:
      - "assistant": the assistant messages of the last turn (analysis, preambles, tool calls, final);
      - "final": the final-channel messages of the last turn;
      - "all_assistant_turns": every assistant message rendered (earlier finished turns without their analysis).
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}: expected one of {TRAIN_ON}")
    messages = to_messages(record)
    turns = _turns(messages)
    last_turn = turns[-1]
    kept = [(m, t) for m, t, v in zip(messages, turns, _visible(messages, keep_turn=last_turn), strict=True) if v]
    tokens: list[int] = []
    mask: list[bool] = []
    continues_output = False  # the previous message was the assistant's, ended by <|end|>: generation goes on
    for index, (message, turn) in enumerate(kept):
        is_last = index == len(kept) - 1
        end = tok.RETURN if is_last and message.role == "assistant" and message.channel == "final" else None
        rendered, prefix = render_message(message, end=end)
        trained = message.role == "assistant" and (
            train_on == "all_assistant_turns"
            or (turn == last_turn and (train_on == "assistant" or message.channel == "final"))
        )
        first_trained = 0 if continues_output else prefix
        mask += [trained and i >= first_trained for i in range(len(rendered))]
        tokens += rendered
        continues_output = message.role == "assistant" and rendered[-1] == tok.END
    if not any(mask):
        raise RecordError(f"no assistant message to train on (train_on={train_on!r})")
    return tokens, mask


# ---- parsing ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ParseResult:
    messages: list[Message]  # complete messages
    partial: Message | None  # a message cut off before its end token (e.g. by max_new_tokens)
    error: str | None  # the first thing that did not parse (the parser skipped ahead to the next <|start|>)
    stop_token: int | None  # the end token of the last complete message


class StreamParser:
    """Token ids -> harmony messages, one token at a time, as they are generated. Never raises: malformed
    output is reported in `error` and the parser resumes at the next `<|start|>`.

    `role`: the role whose header is already open (a prompt ending in `<|start|>assistant`), or None to expect
    a `<|start|>` first.
    """

    def __init__(self, role: str | None = None):
        self.messages: list[Message] = []
        self.error: str | None = None
        self.stop_token: int | None = None
        self.delta = ""  # the text the last token added to the current message's content
        self.in_content = False  # the last token was part of a message's content (its text may still be partial)
        self._role = role
        self._state = "header" if role else "start"
        self._header: list[int] = []
        self._open: Message | None = None
        self._content: list[str] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._position = 0

    def feed(self, token: int) -> StreamParser:
        self.delta, self.in_content = "", False
        position, self._position = self._position, self._position + 1
        if self._state == "start" or self._state == "skip":
            if token == tok.START:
                self._state, self._header, self._role = "header", [], None
            elif self._state == "start":
                self._fail(f"token {position}: expected <|start|>, got {token}")
        elif self._state == "header":
            if token == tok.MESSAGE:
                header = parse_header(self._header, self._role)
                if isinstance(header, str):
                    self._fail(f"token {position}: {header}")
                else:
                    self._state, self._open, self._content = "content", header, []
                    self._decoder.reset()
            elif token in STOP_TOKENS or token == tok.START:
                self._fail(f"token {position}: message header ended without <|message|>")
                if token == tok.START:
                    self._state, self._header, self._role = "header", [], None
            else:
                self._header.append(token)
        else:  # content
            if token in STOP_TOKENS:
                self.messages.append(self._close())
                self.stop_token, self._state = token, "start"
            else:
                self.delta, self.in_content = self._decoder.decode(_token_bytes(token)), True
                self._content.append(self.delta)
        return self

    def feed_all(self, tokens: Iterable[int]) -> StreamParser:
        for token in tokens:
            self.feed(token)
        return self

    @property
    def current(self) -> Message | None:
        """The message being generated, with its content so far."""
        return dataclasses.replace(self._open, text="".join(self._content)) if self._state == "content" else None

    def result(self) -> ParseResult:
        """Everything parsed so far; a message still open counts as `partial`. Parsing may go on after."""
        partial = self._close() if self._state == "content" else None
        error = self.error
        if self._state == "header" and self._header:
            error = error or HEADER_CUT
        return ParseResult(list(self.messages), partial, error, self.stop_token)

    def _close(self) -> Message:
        """The open message with its text, incomplete UTF-8 at the end shown as U+FFFD."""
        state = self._decoder.getstate()
        text = "".join(self._content) + self._decoder.decode(b"", True)
        self._decoder.setstate(state)
        return dataclasses.replace(self._open, text=text)

    def _fail(self, reason: str) -> None:
        self.error = self.error or reason
        self._state = "skip"


def parse(tokens: Iterable[int], role: str | None = None) -> ParseResult:
    """Parses a whole token sequence (see StreamParser)."""
    return StreamParser(role).feed_all(tokens).result()


def _token_bytes(token: int) -> bytes:
    try:
        return tok.get_encoding().decode_single_token_bytes(token)
    except KeyError:
        return "\ufffd".encode()


def parse_header(tokens: list[int], role: str | None) -> Message | str:
    """A header's role, name, recipient, channel and content type, or the reason it does not parse."""
    text = b"".join(_token_bytes(t) for t in tokens).decode("utf-8", errors="replace")
    channel = None
    if "<|channel|>" in text:
        before, after = text.split("<|channel|>", 1)
        end = next((i for i, c in enumerate(after) if c.isspace() or c == "<"), len(after))
        channel, text = after[:end], before + after[end:]
        if not channel:
            return "<|channel|> without a channel name"
    text = text.strip().replace("<|constrain|>", " <|constrain|>")
    parts = text.split()
    name = None
    if role is None:
        if not parts:
            return "message header without a role"
        if parts[0] in ROLES:
            role = parts.pop(0)
        elif len(parts) > 1 or parts[0].startswith("to="):
            role, name = "tool", parts.pop(0)
        else:
            return f"unknown role {parts[0]!r}"
    elif parts and parts[0] == role:
        parts.pop(0)
    recipient = content_type = None
    if parts and parts[-1].startswith("<|constrain|>"):  # `final <|constrain|>json`: a type, not a recipient
        content_type = parts.pop()
    if parts:
        last = parts.pop()
        if last.startswith("to=") or content_type or not parts:
            recipient = last.removeprefix("to=")
        else:
            content_type, recipient = last, parts.pop().removeprefix("to=")
    if parts:
        return f"unexpected text in the message header: {' '.join(parts)!r}"
    return Message(role, "", channel, recipient, content_type, name)
