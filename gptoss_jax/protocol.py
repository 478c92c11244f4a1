"""The request protocol both HTTP APIs share (Chat Completions in `server`, Responses in `responses`): every field
held to its JSON type, tools split into the caller's functions and the server's built-in ones, the harmony prompt
and sampling settings of a request, and a choice's completion as it streams (`Choice`: its tool turns, stop
strings, logprobs and finish reason). No HTTP here: a request the API refuses raises `BadRequest`, which the HTTP
layer answers with a 400.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import secrets
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import jsonschema

from gptoss_jax import agent, constrain, harmony
from gptoss_jax import tokenizer as tok
from gptoss_jax.engine import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, Engine, Request

# Each field this server reads, with its JSON type in OpenAI's API reference (`top_k`: vLLM's); null is the
# default everywhere. `check_fields` holds every request of both APIs to these types: a value of another type is
# a 400, never coerced ("false" does not turn streaming off, 1.5 tokens are not 1).
_FIELDS = {"model": "string", "messages": "array", "tools": "array", "tool_choice": "string|object",
           "parallel_tool_calls": "boolean", "reasoning_effort": "string", "temperature": "number",
           "top_p": "number", "top_k": "integer", "max_tokens": "integer", "max_completion_tokens": "integer",
           "seed": "integer", "stop": "string|array", "stream": "boolean", "stream_options": "object",
           "n": "integer", "logprobs": "boolean", "top_logprobs": "integer", "response_format": "object",
           "presence_penalty": "number", "frequency_penalty": "number", "logit_bias": "object"}
# Spec fields that only label or route a request elsewhere (stored completions, billing tiers, abuse and cache
# keys): accepted, with no effect on what is generated.
_LABELS = {"user": "string", "metadata": "object", "store": "boolean", "service_tier": "string",
           "prompt_cache_key": "string", "safety_identifier": "string"}
_JSON_TYPES = {"string": str, "array": list, "object": dict, "boolean": bool, "integer": int, "number": int | float}
# Spec fields this server honours only at the value that changes nothing (clients send those by default): any
# other value is a 400 naming the field, never silently ignored.
_NEUTRAL = {"audio": (None,), "modalities": (["text"], None), "prediction": (None,), "functions": (None, []),
            "function_call": (None, "none", "auto"), "web_search_options": (None,), "verbosity": (None,)}
DEFAULT_MAX_TOKENS = 2048
MAX_TOKENS = (1 << 31) - 1  # the most a request's budget may say (int32), whatever this server's context
MAX_CHOICES = 64


class BadRequest(ValueError):
    """A request the API refuses (HTTP 400); the message says what to change. Its `param` (the error body's) is the
    field it names: given, or the path every message about one field starts with ("tools[0].type: expected ...")."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        field = _FIELD_PATH.match(message)
        self.param = param or (field.group(1) if field else None)


_FIELD_PATH = re.compile(r"([A-Za-z_][\w.]*(?:\[[^\]]*\][\w.]*)*): ")


# ---- requests -------------------------------------------------------------------------------------------------


def parse_request(body: Any, max_length: int, server_tools: Sequence[str] = ()) -> tuple[list[int], dict[str, Any]]:
    """(prompt tokens, generation settings) of a chat completion request. `server_tools`: the built-in tools this
    server runs (`serve --tools`), which a request may enable."""
    check_fields(body, _FIELDS, _LABELS, _NEUTRAL)
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        raise BadRequest("top_logprobs: needs logprobs: true")
    if not body.get("messages"):  # its type is checked with the others'
        raise BadRequest("messages: a non-empty list is required")
    calls_allowed = _tool_choice(body.get("tool_choice")) != "none"
    functions, builtin = split_tools(body.get("tools") or [], server_tools)
    if not calls_allowed:
        functions, builtin = [], []  # the model is not told of them (and `Completion` reports no call)
    record = {"messages": [_message(m, i) for i, m in enumerate(body["messages"])], "tools": functions,
              "builtin_tools": builtin, "reasoning_effort": body.get("reasoning_effort") or "medium",
              "response_format": body.get("response_format")}
    prompt, settings = prepare(record, max_length, body.get("max_completion_tokens", body.get("max_tokens")),
                               "max_tokens")
    settings.update(sampling(body))
    settings.update({
        "logprobs": bool(body.get("logprobs", False)),
        "top_logprobs": int(number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)),
        "tool_calls": calls_allowed,
    })
    return prompt, settings


def sampling(body: dict, max_stops: int = 4) -> dict[str, Any]:
    """The sampling settings, choices, stop strings (at most `max_stops`: OpenAI's 4 by default) and streaming
    options of a request (both completion APIs)."""
    for option, value in (body.get("stream_options") or {}).items():
        if option != "include_usage":
            raise BadRequest(f"stream_options.{option}: not an option (include_usage)")
        check_type(value, "boolean", "stream_options.include_usage")
    choices = 1 if body.get("n") is None else body["n"]
    if not 1 <= choices <= MAX_CHOICES:
        raise BadRequest(f"n: expected an integer in [1, {MAX_CHOICES}], got {choices!r}")
    return {
        "temperature": number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": number(body, "top_p", 1.0, 1e-9, 1.0),
        "top_k": int(number(body, "top_k", 0, 0, 1 << 20)),
        # No seed: a fresh draw per request, as OpenAI samples; choice i of n draws with seed + i.
        "seed": int(number(body, "seed", secrets.randbelow(1 << 31), -(1 << 31), (1 << 31) - 1)),
        "n": choices,
        "presence_penalty": number(body, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        "logit_bias": _logit_bias(body.get("logit_bias")),
        "stream": bool(body.get("stream", False)),
        "stop": _stop_strings(body.get("stop"), max_stops),
    }


def check_fields(body: Any, honoured: dict[str, str], labels: dict[str, str], neutral: dict[str, tuple]) -> None:
    """A request body names only fields of the spec (a typo is a 400), each of the JSON type the spec gives it
    (`honoured` and `labels`: name -> type), and those in `neutral` only at a value that changes nothing (a value
    this server cannot honour is a 400 naming the field, never silently ignored)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - set(honoured) - set(labels) - set(neutral))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; supported: {sorted(honoured | labels)}", unknown[0])
    for name, kind in (honoured | labels).items():
        if body.get(name) is not None:
            check_type(body[name], kind, name)
    for name, values in neutral.items():
        if name in body and body[name] not in values:
            raise BadRequest(f"{name}: {json.dumps(body[name])} is not supported by this server (only "
                             f"{' or '.join(json.dumps(v) for v in values)})")


def check_type(value: Any, kind: str, where: str) -> None:
    """`value` is of JSON type `kind` ("string", "integer", ..., or alternatives joined by "|"), else a 400 naming
    `where`. JSON's true and false are not numbers here, and 1.0 is not an integer."""
    for name in kind.split("|"):
        wanted = _JSON_TYPES[name]
        if isinstance(value, wanted) and (name == "boolean" or not isinstance(value, bool)):
            return
    article = "an" if kind[0] in "aeiou" else "a"
    raise BadRequest(f"{where}: expected {article} {kind.replace('|', ' or ')}, got {json.dumps(value)[:100]}")


# What a request's `tools` may name besides functions: the built-in tools by their harmony names, and by the
# Responses API's names for the same kinds of tool.
BUILTIN_TYPES = {"python": "python", "code_interpreter": "python", "browser": "browser", "web_search": "browser",
                 "web_search_preview": "browser"}


def split_tools(tools: Any, server_tools: Sequence[str]) -> tuple[list, list[str]]:
    """(function tools, names of the built-in tools enabled) of a request's `tools` (a list: `check_fields`)."""
    functions, builtin = [], []
    for index, tool in enumerate(tools):
        kind = tool.get("type", "function") if isinstance(tool, dict) else "function"
        if kind == "function":
            _check_parameters(tool, f"tools[{index}]")
            functions.append(tool)
        elif kind in BUILTIN_TYPES:
            name = BUILTIN_TYPES[kind]
            if name not in server_tools:
                raise BadRequest(f"tools[{index}]: the built-in {name} tool is not enabled on this server (start it "
                                 f"with --tools {name})")
            builtin.append(name)
        else:
            raise BadRequest(f"tools[{index}].type: expected \"function\" or a built-in tool "
                             f"({', '.join(BUILTIN_TYPES)}), got {kind!r}")
    return functions, sorted(set(builtin))


def _check_parameters(tool: Any, where: str) -> None:
    """A function tool's `parameters` is a JSON Schema (checked against its metaschema, strict or not: the model
    is shown it, and a strict one constrains the call)."""
    function = tool.get("function", tool) if isinstance(tool, dict) else None
    parameters = function.get("parameters") if isinstance(function, dict) else None
    if parameters is None:
        return  # harmony's record check names a malformed tool
    if not isinstance(parameters, dict):
        raise BadRequest(f"{where}.function.parameters: expected a JSON Schema object, got {json.dumps(parameters)}")
    try:
        jsonschema.validators.validator_for(parameters, default=jsonschema.Draft202012Validator).check_schema(
            parameters)
    except jsonschema.SchemaError as error:
        path = "".join(f"[{json.dumps(part)}]" for part in error.absolute_path)
        raise BadRequest(f"{where}.function.parameters{path}: not a JSON Schema: {error.message}") from None


def prepare(record: dict, max_length: int, limit: Any, limit_name: str) -> tuple[list[int], dict[str, Any]]:
    """The prompt of a conversation record, and the settings that follow from it: the structured-output
    constraint, the built-in tools, and the completion budget (`limit`: the request's, None for the default)."""
    try:
        prompt = harmony.encode_chat(record)
        final = constrain.for_response_format(record.get("response_format"))
        strict = constrain.strict_tools(record["tools"])
        if final or strict:
            constrain.start(prompt, final, strict)  # a grammar the engine cannot compile is a 400 now
    except (harmony.RecordError, constrain.ConstraintError) as error:
        raise BadRequest(str(error)) from None
    room = max_length - len(prompt)
    if room < 1:
        raise BadRequest(f"the prompt is {len(prompt)} tokens; this server's context holds {max_length}")
    return prompt, {"max_tokens": budget(limit, limit_name, room, DEFAULT_MAX_TOKENS), "final_format": final,
                    "strict_tools": strict, "formatted": final is not None, "builtin_tools": record["builtin_tools"]}


def budget(limit: Any, limit_name: str, room: int, default: int, least: int = 1) -> int:
    """The tokens a request may generate: its `limit` (None: `default`), capped at the `room` its prompt leaves.
    Capped, not refused, and a reply that fills it ends "length": clients send budgets without knowing this
    server's context (OpenAI's gpt-oss eval client asks 131,072 of every request)."""
    asked = default if limit is None else number({limit_name: limit}, limit_name, 0, least, MAX_TOKENS)
    return min(int(asked), room)


def _tool_choice(choice: Any) -> str:
    """The tool choice, "auto" (the default: the model decides) or "none" (the tools are left out of the prompt).
    Forcing a call ("required", or one named function) needs decoding constrained to a call, which this server
    does not do: refused rather than ignored. (`parallel_tool_calls` needs nothing: gpt-oss ends its turn at each
    call, so a response holds at most one.)"""
    if choice is None or choice in ("auto", "none"):
        return choice or "auto"
    if choice == "required" or isinstance(choice, dict):
        raise BadRequest(f"tool_choice: {json.dumps(choice)} is not supported (a forced call needs constrained "
                         "decoding); use \"auto\" or \"none\"")
    raise BadRequest(f"tool_choice: expected \"auto\", \"none\", \"required\" or a function, got {choice!r}")


def _message(message: Any, index: int) -> dict:
    if not isinstance(message, dict):
        raise BadRequest(f"messages[{index}]: expected an object")
    message = {k: v for k, v in message.items() if v is not None}
    for name in ("reasoning_content", "reasoning"):  # analysis sent back by clients, under either name
        if name in message:
            message["thinking"] = message.pop(name)
    return message


def number(body: dict, name: str, default, low, high, hint: str = "") -> float:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        explained = f" ({hint})" if hint else ""
        raise BadRequest(f"{name}: expected a number in [{low}, {high}], got {value!r}{explained}")
    return value


def _logit_bias(bias: Any) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}, at most MAX_LOGIT_BIAS entries."""
    if bias is None:
        return {}
    if len(bias) > MAX_LOGIT_BIAS:  # an object: `check_fields`
        raise BadRequest(f"logit_bias: expected an object of at most {MAX_LOGIT_BIAS} token ids, got {bias!r}")
    vocabulary = tok.get_encoding().n_vocab
    parsed = {}
    for token in bias:
        if not (str(token).isascii() and str(token).isdigit() and int(token) < vocabulary):
            raise BadRequest(f"logit_bias: {token!r} is not a token id in [0, {vocabulary})")
        name = f"logit_bias[{token!r}]"
        parsed[int(token)] = number({name: bias[token]}, name, 0, -100, 100)
    return parsed


def _stop_strings(stop: Any, most: int) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > most:
        raise BadRequest(f"stop: a string or a list of up to {most} non-empty strings")
    return stops


# ---- responses ------------------------------------------------------------------------------------------------


class Completion:
    """One request's output as it is generated: the harmony parser, the text per channel, and stop strings."""

    def __init__(self, stops: list[str], calls_allowed: bool = True, final_only: bool = False):
        self.parser = harmony.StreamParser(role="assistant")
        self.stops = stops
        self.calls_allowed = calls_allowed  # tool_choice "none": a call the model makes anyway is not reported
        self.final_only = final_only  # a response format: content is the (constrained) final channel alone
        self.reasoning, self.content = "", ""
        self.sent = 0  # how much of the content has been handed out
        self.stopped = False  # a stop string was reached
        self.in_content = False  # the last token fed is part of the content (its logprob is reported)

    def feed(self, token: int) -> dict[str, str]:
        """The new text of this token by field (reasoning_content, content), up to any stop string. Content that
        may be the start of a stop string is held back until the next tokens tell (then, or at `rest`)."""
        self.parser.feed(token)
        current, delta = self.parser.current, self.parser.delta
        self.in_content = (self.parser.in_content and not self.stopped and current.recipient is None
                           and current.channel != "analysis" and (current.channel == "final" or not self.final_only))
        if not delta or current is None or self.stopped:
            return {}
        if current.recipient is not None:  # a call's arguments or code: reported whole at the end (or run here)
            return {}
        if current.channel == "analysis":
            self.reasoning += delta
            return {"reasoning_content": delta, "reasoning": delta}
        if self.final_only and current.channel != "final":  # a preamble would break the formatted answer
            return {}
        self.content, self.stopped, held = cut_at_stop(self.content + delta, self.stops)
        return self._hand_out(len(self.content) - held)

    def new_turn(self) -> None:
        """The model generates again after a built-in tool's answer: a new `<|start|>assistant` message."""
        self.parser = harmony.StreamParser(role="assistant")

    def rest(self) -> dict[str, str]:
        """The content still held back, once generation has ended."""
        return self._hand_out(len(self.content))

    def _hand_out(self, end: int) -> dict[str, str]:
        text, self.sent = self.content[self.sent:end], max(self.sent, end)
        return {"content": text} if text else {}

    def tool_calls(self) -> list[dict]:
        if not self.calls_allowed:
            return []
        result = self.parser.result()
        calls = [m for m in result.messages if m.role == "assistant" and (m.recipient or "").startswith("functions.")]
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": m.recipient.removeprefix("functions."), "arguments": m.text}} for m in calls]


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool, int]:
    """(the text up to the earliest stop string — whichever string it is, stops may overlap —, whether one was
    found, how many of its last characters may be the start of one: held back until the next tokens tell)."""
    found = [text.find(stop) for stop in stops if stop in text]
    if found:
        return text[: min(found)], True, 0
    return text, False, max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


def token_logprob(token: int, logprob: float, top: Sequence[tuple[int, float]] = ()) -> dict:
    """One generated token as OpenAI reports it: its text, UTF-8 bytes and log probability, and the same of the
    most likely tokens at its position (`top`: (token, logprob) pairs)."""
    raw = tok.get_encoding().decode_single_token_bytes(token)
    return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw), "logprob": logprob,
            "top_logprobs": [token_logprob(other, value) for other, value in top]}


class Choice:
    """One choice of a request: a conversation on the engine through the agent's tool loop (`agent.ToolLoop`), which
    answers the built-in tools the request enabled and goes on in the choice's kept slot; `max_tokens` bounds the
    tokens of all its turns together. Events go to `events` as (index, "token", (token, logprob, top)), (index, "tool",
    (call, answer)) and, last, (index, "done", reason): "stop", "length", "cancelled" or "error: ..."."""

    def __init__(self, engine: Engine, prompt: list[int], settings: dict[str, Any], index: int,
                 events: asyncio.Queue, make_tools: Callable[[Sequence[str]], agent.Toolset] | None,
                 tool_threads: concurrent.futures.Executor | None = None):
        self.settings, self.index, self.events, self.tool_threads = settings, index, events, tool_threads
        tools = make_tools(settings["builtin_tools"]) if settings["builtin_tools"] else None
        self.conversation = agent.Conversation({}, list(prompt), tools)
        self.turns = agent.ToolLoop(
            engine, self.conversation, self._request, max_turns=settings["max_turns"],
            max_new_tokens=settings["max_tokens"], budget=settings["max_tokens"], limit=engine.max_length,
            on_token=lambda token, logprob, top: events.put_nowait((index, "token", (token, logprob, top))),
            on_step=self._step, tool_threads=tool_threads)

    def start(self) -> None:
        """Submits the first turn now, so that a request the engine refuses fails before any response."""
        self.turns.start()
        asyncio.create_task(self._run())

    def cancel(self) -> None:
        """Ends the choice early (its client left, or a stop string was reached)."""
        self.turns.cancel()

    def _request(self, prompt: list[int], turn: int) -> Request:
        settings = self.settings
        final, strict = settings["final_format"], settings["strict_tools"]
        return Request(prompt, 0, settings["temperature"], settings["top_p"], settings.get("top_k", 0),
                       as_int32(settings["seed"] + self.index + turn * 1_000_003), (),
                       settings.get("presence_penalty", 0.0), settings.get("frequency_penalty", 0.0),
                       settings.get("logit_bias", {}), settings.get("logprobs", False),
                       settings.get("top_logprobs", 0),
                       constraint=constrain.start(prompt, final, strict) if final or strict else None)

    def _step(self, step: agent.Step) -> None:
        if step.kind == "tool":  # the call it answers is the last one made
            self.events.put_nowait((self.index, "tool", (self.conversation.tool_calls[-1], step.messages[0])))

    async def _run(self) -> None:
        finish = (await self.turns.run()).finish
        # out of turns, budget or context: "length"; else as its last turn ended (a text that does not parse as
        # harmony is the reply's to report, not the choice's end)
        reason = "length" if finish in ("max_turns", "max_tokens", "length") else self.turns.reason
        self.events.put_nowait((self.index, "done", reason))
        if self.conversation.tools is not None:  # after the answer went out: closing a kernel takes a moment
            await asyncio.get_running_loop().run_in_executor(self.tool_threads, self.conversation.tools.close)


def as_int32(seed: int) -> int:
    return (seed + (1 << 31)) % (1 << 32) - (1 << 31)


def finish_reason(reason: str, calls: list[dict], stopped: bool) -> str:
    if calls:
        return "tool_calls"
    return "stop" if stopped or reason in ("stop", "cancelled") else "length"


# ---- the app --------------------------------------------------------------------------------------------------
