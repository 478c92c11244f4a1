"""The Responses API on `gptoss-jax serve`: `POST /v1/responses` and `GET /v1/responses/{id}`.

A request's `input` (a text, or items: messages, reasoning, function calls and their outputs) after the stored
conversation of `previous_response_id` and under its `instructions` becomes a harmony conversation; the model's
messages come back as output items — `reasoning` (the analysis), `message` (the final answer, or a commentary
preamble), `function_call` (for the caller to answer in a later request), and, when the server runs built-in tools
(`serve --tools`) and the request enables them (`{"type": "code_interpreter"}` / `{"type": "web_search_preview"}`,
or "python" / "browser"), `code_interpreter_call` and `web_search_call` items for the calls the server answered.
Streamed (`stream: true`), the same items arrive as the Responses event types (`response.created`,
`response.output_item.added`, `response.reasoning_text.delta`, `response.output_text.delta`,
`response.function_call_arguments.delta`, ..., `response.completed`). Stored responses (`store`, the default)
are kept in memory, the latest `STORED_RESPONSES`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from gptoss_jax import agent, harmony
from gptoss_jax.protocol import BadRequest, Choice, check_fields, check_type, number, prepare, split_tools

STORED_RESPONSES = 1000
# Each field read, with its JSON type in OpenAI's API reference (see protocol.check_fields).
_FIELDS = {"model": "string", "input": "string|array", "instructions": "string", "reasoning": "object",
           "tools": "array", "tool_choice": "string|object", "parallel_tool_calls": "boolean",
           "previous_response_id": "string", "store": "boolean", "stream": "boolean", "max_output_tokens": "integer",
           "max_tool_calls": "integer", "temperature": "number", "top_p": "number", "text": "object"}
_LABELS = {"metadata": "object", "user": "string", "safety_identifier": "string", "prompt_cache_key": "string",
           "prompt_cache_retention": "string", "service_tier": "string", "stream_options": "object"}
# Honoured only at the value that changes nothing; any other value is a 400 naming the field.
_NEUTRAL = {"background": (False, None), "truncation": ("disabled", None), "top_logprobs": (0, None),
            "include": (None, [], ["code_interpreter_call.outputs"]), "conversation": (None,), "prompt": (None,),
            "context_management": (None,), "moderation": (None,), "access_programs": (None,),
            "background_options": (None,), "image": (None,), "prompt_cache_options": (None,)}


class Store:
    """Stored responses by id, the oldest forgotten first: each with the conversation it ends (record messages,
    harmony-native for what the model and the tools wrote) and its function calls' ids."""

    def __init__(self, size: int = STORED_RESPONSES):
        self.size, self.entries = size, collections.OrderedDict()

    def put(self, response: dict, messages: list[dict], call_names: dict[str, str]) -> None:
        self.entries[response["id"]] = (response, messages, call_names)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def get(self, response_id: str) -> tuple[dict, list[dict], dict[str, str]]:
        if response_id not in self.entries:
            raise KeyError(response_id)
        return self.entries[response_id]


def parse(body: Any, store: Store, max_length: int, server_tools: Sequence[str]) -> tuple[list[int], dict, dict]:
    """(prompt tokens, generation settings, what the response echoes and stores) of a Responses request."""
    check_fields(body, _FIELDS, _LABELS, _NEUTRAL)
    history, call_names = [], {}
    if body.get("previous_response_id") is not None:
        try:
            _, history, call_names = store.get(body["previous_response_id"])
        except KeyError:
            raise BadRequest(f"previous_response_id: no stored response {body['previous_response_id']!r}") from None
        call_names = dict(call_names)
    added = _input(body.get("input"), call_names)
    effort = _effort(body.get("reasoning"))
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise BadRequest(f"tool_choice: {json.dumps(choice)} is not supported (a forced call needs constrained "
                         "decoding); use \"auto\" or \"none\"")
    functions, builtin = split_tools([_function(t) for t in body.get("tools") or []], server_tools)
    if choice == "none":
        functions, builtin = [], []
    instructions = body.get("instructions")
    record = {"messages": ([{"role": "developer", "content": instructions}] if instructions else [])
              + history + added, "tools": functions, "builtin_tools": builtin, "reasoning_effort": effort,
              "response_format": _text_format(body.get("text"))}
    if not record["messages"]:
        raise BadRequest("input: the conversation is empty")
    prompt, settings = prepare(record, max_length, body.get("max_output_tokens"), "max_output_tokens")
    calls = body.get("max_tool_calls")
    settings.update({
        "temperature": number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": number(body, "top_p", 1.0, 1e-9, 1.0),
        "seed": secrets.randbelow(1 << 31),
        "max_tool_calls": None if calls is None else int(number(body, "max_tool_calls", 0, 0, 1 << 10)),
    })
    echo = {"instructions": instructions, "metadata": body.get("metadata") or {}, "tools": body.get("tools") or [],
            "tool_choice": choice or "auto", "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"), "temperature": settings["temperature"],
            "top_p": settings["top_p"], "reasoning": {"effort": effort, "summary": None},
            "max_output_tokens": body.get("max_output_tokens"), "store": body.get("store", True) is not False,
            "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
            "truncation": "disabled", "user": body.get("user"),
            "conversation": history + added, "call_names": call_names}
    return prompt, settings, echo


def _input(items: Any, call_names: dict[str, str]) -> list[dict]:
    """Record messages of `input`: a text (one user message) or a list of items."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise BadRequest("input: expected a string or a list of items")
    messages = []
    for index, item in enumerate(items):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where}: expected an object")
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") not in ("user", "assistant", "system", "developer"):
                raise BadRequest(f"{where}.role: expected user, assistant, system or developer, got "
                                 f"{item.get('role')!r}")
            messages.append({"role": item["role"], "content": _text(item.get("content"), where)})
        elif kind == "reasoning":
            parts = item.get("content") or []
            check_type(parts, "array", f"{where}.content")
            for number, part in enumerate(parts):  # {"type": "reasoning_text", "text": ...}
                check_type(part, "object", f"{where}.content[{number}]")
                check_type(part.get("text"), "string", f"{where}.content[{number}].text")
            text = "".join(part["text"] for part in parts)
            messages.append({"role": "assistant", "channel": "analysis", "content": text})
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
                raise BadRequest(f"{where}: a function_call needs a name and a call_id")
            call_names[item["call_id"]] = item["name"]
            messages.append({"role": "assistant", "tool_calls": [{"id": item["call_id"], "function": {
                "name": item["name"], "arguments": item.get("arguments") or "{}"}}]})
        elif kind == "function_call_output":
            check_type(item.get("call_id"), "string", f"{where}.call_id")
            name = call_names.get(item["call_id"])
            if name is None:
                raise BadRequest(f"{where}.call_id: {item.get('call_id')!r} names no function call of this "
                                 "conversation")
            output = item.get("output")
            messages.append({"role": "tool", "name": name,
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise BadRequest(f"{where}.type: {kind!r} is not an input item this server reads (message, reasoning, "
                             "function_call, function_call_output; continue a conversation with built-in tool calls "
                             "through previous_response_id)")
    return messages


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(part["text"] for part in content)
    raise BadRequest(f"{where}.content: expected a string or a list of text parts")


def _effort(reasoning: Any) -> str:
    reasoning = reasoning or {}  # an object or null: `check_fields`
    effort = reasoning.get("effort") or "medium"
    if effort not in harmony.EFFORTS:
        raise BadRequest(f"reasoning.effort: expected one of {harmony.EFFORTS}, got {effort!r}")
    if reasoning.get("summary") not in (None, "auto"):
        raise BadRequest("reasoning.summary: this server returns the reasoning itself, not a summary (null or "
                         "\"auto\")")
    return effort


def _function(tool: Any) -> Any:
    """A Responses function tool ({type, name, description, parameters, strict}) as Chat Completions has it."""
    if isinstance(tool, dict) and tool.get("type") == "function" and "function" not in tool:
        return {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
    return tool


def _text_format(text: Any) -> dict | None:
    """`text.format` as a Chat Completions response_format."""
    if text is None:
        return None
    if set(text) - {"format", "verbosity"}:  # an object: `check_fields`
        raise BadRequest("text: expected {\"format\": ...}")
    if text.get("verbosity") not in (None, "medium"):
        raise BadRequest(f"text.verbosity: {json.dumps(text['verbosity'])} is not supported by this server")
    form = text.get("format") or {"type": "text"}
    check_type(form, "object", "text.format")
    if form.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: v for k, v in form.items() if k != "type"}}
    return None if form.get("type") == "text" else form


# ---- output ---------------------------------------------------------------------------------------------------


class Output:
    """A response's output items, built from the model's tokens as they come and from the built-in calls the server
    answered; each step returns the stream events that announce it."""

    def __init__(self):
        self.items: list[dict] = []
        self.messages: list[harmony.Message] = []  # what the model and the tools wrote, for the store
        self.call_names: dict[str, str] = {}
        self.reasoning_tokens = 0
        self.parser = harmony.StreamParser(role="assistant")
        self.open: dict | None = None  # the item being written (None: none, or a built-in call's code)

    def token(self, token: int) -> list[dict]:
        closed = len(self.parser.messages)
        self.parser.feed(token)
        events = []
        current = self.parser.current
        if len(self.parser.messages) > closed:
            events += self._close(self.parser.messages[-1], "completed")
        if current is not None:
            self.reasoning_tokens += current.channel == "analysis"
            if self.open is None and not self._is_builtin(current):
                events += self._start(current)
            if self.parser.delta and self.open is not None:
                events += self._delta(self.parser.delta)
        return events

    def tool(self, call: harmony.Message, answer: harmony.Message) -> list[dict]:
        """A built-in call and the server's answer: one completed item; the model then writes a new message."""
        self.messages.append(answer)
        self.parser = harmony.StreamParser(role="assistant")
        if agent.tool_name(call.recipient) == "python":
            item = {"type": "code_interpreter_call", "id": _id("ci"), "code": call.text,
                    "container_id": "gptoss-python", "outputs": [{"type": "logs", "logs": answer.text}]}
        else:
            item = {"type": "web_search_call", "id": _id("ws"), "action": _browser_action(call)}
        item["status"] = "completed"
        self.items.append(item)
        index = len(self.items) - 1
        return [{"type": "response.output_item.added", "output_index": index, "item": item},
                {"type": "response.output_item.done", "output_index": index, "item": item}]

    def finish(self) -> list[dict]:
        """Closes a message cut off by the budget (its item `incomplete`)."""
        partial = self.parser.result().partial
        return self._close(partial, "incomplete") if partial is not None else []

    def _is_builtin(self, message: harmony.Message) -> bool:
        return agent.tool_name(message.recipient) is not None

    def _start(self, message: harmony.Message) -> list[dict]:
        if message.recipient is not None:  # a function call
            name = message.recipient.removeprefix("functions.")
            item = {"type": "function_call", "id": _id("fc"), "call_id": _id("call"), "name": name, "arguments": "",
                    "status": "in_progress"}
            self.call_names[item["call_id"]] = name
        elif message.channel == "analysis":
            item = {"type": "reasoning", "id": _id("rs"), "summary": [],
                    "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"}
        else:
            item = {"type": "message", "id": _id("msg"), "role": "assistant", "status": "in_progress",
                    "phase": "final_answer" if message.channel == "final" else "commentary",
                    "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
        self.items.append(item)
        self.open = item
        events = [{"type": "response.output_item.added", "output_index": len(self.items) - 1,
                   "item": {**item, "content": []} if "content" in item else item}]
        if item["type"] == "message":
            events.append({"type": "response.content_part.added", **self._where(),
                           "part": {"type": "output_text", "text": "", "annotations": []}})
        return events

    def _delta(self, delta: str) -> list[dict]:
        item = self.open
        if item["type"] == "function_call":
            item["arguments"] += delta
            return [{"type": "response.function_call_arguments.delta", **self._where(False), "delta": delta}]
        item["content"][0]["text"] += delta
        kind = "reasoning_text" if item["type"] == "reasoning" else "output_text"
        return [{"type": f"response.{kind}.delta", **self._where(), "delta": delta,
                 **({"logprobs": []} if kind == "output_text" else {})}]

    def _close(self, message: harmony.Message, status: str) -> list[dict]:
        self.messages.append(message)
        item, self.open = self.open, None
        if item is None:  # a built-in call: its item comes with the answer
            return []
        item["status"] = status
        index = len(self.items) - 1
        if item["type"] == "function_call":
            events = [{"type": "response.function_call_arguments.done", **self._where(False, index),
                       "arguments": item["arguments"]}]
        elif item["type"] == "reasoning":
            events = [{"type": "response.reasoning_text.done", **self._where(index=index),
                       "text": item["content"][0]["text"]}]
        else:
            part = item["content"][0]
            events = [{"type": "response.output_text.done", **self._where(index=index), "text": part["text"],
                       "logprobs": []},
                      {"type": "response.content_part.done", **self._where(index=index), "part": part}]
        return events + [{"type": "response.output_item.done", "output_index": index, "item": item}]

    def _where(self, content: bool = True, index: int | None = None) -> dict:
        index = len(self.items) - 1 if index is None else index
        where = {"item_id": self.items[index]["id"], "output_index": index}
        return {**where, "content_index": 0} if content else where


def _browser_action(call: harmony.Message) -> dict:
    """The Responses action of a browser call (its JSON arguments, as far as they parse)."""
    try:
        arguments = json.loads(call.text)
    except json.JSONDecodeError:
        arguments = {}
    arguments = arguments if isinstance(arguments, dict) else {}
    function = call.recipient.removeprefix("browser.")
    if function == "search":
        return {"type": "search", "query": str(arguments.get("query", ""))}
    if function == "find":
        return {"type": "find_in_page", "pattern": str(arguments.get("pattern", "")), "url": ""}
    return {"type": "open_page", "url": str(arguments.get("id", ""))}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---- the endpoint ---------------------------------------------------------------------------------------------


def routes(engine, model_name: str, server_tools: Sequence[str], make_tools: Callable | None, max_turns: int,
           error: Callable, tool_threads, parsed: Callable, watched: Callable) -> list:
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    store = Store()

    async def create(request):
        body, result, refused = await parsed(request, parse, store, engine.max_length, server_tools)
        if refused is not None:
            return refused
        prompt, settings, echo = result
        calls = settings["max_tool_calls"]
        settings["max_turns"] = max_turns if calls is None else min(max_turns, calls + 1)
        events: asyncio.Queue = asyncio.Queue()
        choice = Choice(engine, prompt, settings, 0, events, make_tools, tool_threads)
        try:
            choice.start()
        except ValueError as exc:
            return error(400, str(exc))
        output = Output()
        response = {"id": _id("resp"), "object": "response", "created_at": int(time.time()), "model": model_name,
                    "status": "in_progress", "output": output.items, "error": None, "incomplete_details": None,
                    "usage": None, **{k: v for k, v in echo.items() if k not in ("conversation", "call_names")}}

        async def steps():
            """Yields each step's events; sets the response's status and usage at the end."""
            while True:
                _, kind, value = await events.get()
                if kind == "token":
                    yield output.token(value[0])
                elif kind == "tool":
                    yield output.tool(*value)
                else:
                    yield output.finish()
                    _conclude(response, value, len(prompt), choice.turns.generated, output.reasoning_tokens)
                    if response["store"] and not value.startswith("error"):
                        store.put(response, echo["conversation"] + [agent.as_record(m) for m in output.messages],
                                  {**echo["call_names"], **output.call_names})
                    return

        if not body.get("stream"):
            async with watched(request, choice.cancel):  # a client that leaves stops its tool turns too
                async for _ in steps():
                    pass
            if response["status"] == "failed":
                return error(500, f"generation failed: {response['error']['message']}", "server_error")
            return JSONResponse(response)

        async def stream():
            number = 0

            def event(payload):
                nonlocal number
                number += 1
                return f"event: {payload['type']}\ndata: {json.dumps({**payload, 'sequence_number': number - 1})}\n\n"

            try:
                yield event({"type": "response.created", "response": response})
                yield event({"type": "response.in_progress", "response": response})
                async for batch in steps():
                    for payload in batch:
                        yield event(payload)
                kind = {"completed": "completed", "incomplete": "incomplete"}.get(response["status"], "failed")
                yield event({"type": f"response.{kind}", "response": response})
            finally:  # also when the client leaves
                choice.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def retrieve(request):
        try:
            response, _, _ = store.get(request.path_params["response_id"])
        except KeyError:
            return error(404, f"no stored response {request.path_params['response_id']!r}", "not_found_error")
        return JSONResponse(response)

    return [Route("/v1/responses", create, methods=["POST"]),
            Route("/v1/responses/{response_id}", retrieve, methods=["GET"])]


def _conclude(response: dict, reason: str, prompt_tokens: int, generated: int, reasoning: int) -> None:
    if reason.startswith("error"):
        response["status"], response["error"] = "failed", {"code": "server_error", "message": reason}
    elif reason == "length":
        response["status"], response["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
    else:
        response["status"] = "completed"
    response["usage"] = {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                         "output_tokens": generated, "output_tokens_details": {"reasoning_tokens": reasoning},
                         "total_tokens": prompt_tokens + generated}
