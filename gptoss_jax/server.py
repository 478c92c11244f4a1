"""`gptoss-jax serve`: an OpenAI-compatible Chat Completions server over the continuous-batching engine.

HTTP stack: Starlette on uvicorn (the `serve` extra) — a small, widely used ASGI pair: uvicorn parses HTTP,
Starlette routes and streams server-sent events, and the engine runs in its own thread. Endpoints:
`POST /v1/chat/completions` (streaming or not), `GET /v1/models`, `GET /health`. The assistant's analysis comes
back as `reasoning_content` and as `reasoning` (the two names vLLM has used; OpenAI's gpt-oss eval client reads
`reasoning`), never in `content`; tool calls as `tool_calls` with JSON arguments.
Structured outputs: `response_format` (`json_object`, or `json_schema` — also shown to the model as the developer
message's `# Response Formats`) holds the final answer to it, and `strict: true` function tools hold their calls'
arguments to their parameters; the analysis stays free (`gptoss_jax.constrain`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from gptoss_jax import constrain, harmony
from gptoss_jax import tokenizer as tok
from gptoss_jax.generation import DEFAULT_STOP_TOKENS
from gptoss_jax.serving import MAX_LOGIT_BIAS, Engine, Request

_FIELDS = {"model", "messages", "tools", "tool_choice", "parallel_tool_calls", "reasoning_effort", "temperature",
           "top_p", "top_k", "max_tokens", "max_completion_tokens", "seed", "stop", "stream", "stream_options", "n",
           "logprobs", "top_logprobs", "response_format", "presence_penalty", "frequency_penalty", "logit_bias"}
# Spec fields that only label or route a request elsewhere (stored completions, billing tiers, abuse and cache
# keys): accepted, with no effect on what is generated.
_LABELS = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
# Spec fields this server honours only at the value that changes nothing (clients send those by default): any
# other value is a 400 naming the field, never silently ignored.
_NEUTRAL = {"audio": (None,), "modalities": (["text"], None), "prediction": (None,), "functions": (None, []),
            "function_call": (None, "none", "auto"), "web_search_options": (None,), "verbosity": (None,)}
DEFAULT_MAX_TOKENS = 2048
MAX_CHOICES = 64


class BadRequest(ValueError):
    """A request the API refuses (HTTP 400); the message says what to change."""


# ---- requests -------------------------------------------------------------------------------------------------


def parse_request(body: Any, max_length: int) -> tuple[list[int], dict[str, Any]]:
    """(prompt tokens, generation settings) of a chat completion request."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS - _LABELS - set(_NEUTRAL))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; supported: {sorted(_FIELDS | _LABELS)}")
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise BadRequest(f"{name}: {json.dumps(body[name])} is not supported by this server (only "
                             f"{' or '.join(json.dumps(v) for v in neutral)})")
    if body.get("top_logprobs"):
        raise BadRequest("top_logprobs: only the chosen token's logprob is returned (logprobs=true)")
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise BadRequest("messages: a non-empty list is required")
    tools = body.get("tools") or []
    calls_allowed = _tool_choice(body.get("tool_choice")) != "none"
    if not calls_allowed:
        tools = []  # the model is not told of them (and `Completion` reports no call)
    if not isinstance(body.get("parallel_tool_calls", True), bool):
        raise BadRequest("parallel_tool_calls: expected true or false")
    record = {"messages": [_message(m, i) for i, m in enumerate(body["messages"])],
              "tools": tools, "reasoning_effort": body.get("reasoning_effort") or "medium",
              "response_format": body.get("response_format")}
    try:
        prompt = harmony.encode_chat(record)
        final, strict = constrain.for_response_format(record["response_format"]), constrain.strict_tools(tools)
    except (harmony.RecordError, constrain.ConstraintError) as error:
        raise BadRequest(str(error)) from None
    choices = 1 if body.get("n") is None else body["n"]
    if isinstance(choices, bool) or not isinstance(choices, int) or not 1 <= choices <= MAX_CHOICES:
        raise BadRequest(f"n: expected an integer in [1, {MAX_CHOICES}], got {choices!r}")
    settings = {
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 1e-9, 1.0),
        "top_k": int(_number(body, "top_k", 0, 0, 1 << 20)),
        # No seed: a fresh draw per request, as OpenAI samples; choice i of n draws with seed + i.
        "seed": int(_number(body, "seed", secrets.randbelow(1 << 31), -(1 << 31), (1 << 31) - 1)),
        "n": choices,
        "presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        "logit_bias": _logit_bias(body.get("logit_bias")),
        "stream": bool(body.get("stream", False)),
        "stop": _stop_strings(body.get("stop")),
        "logprobs": bool(body.get("logprobs", False)),
        "tool_calls": calls_allowed,
        # each choice follows the constraint on its own
        "constraints": [constrain.start(prompt, final, strict) if final or strict else None
                        for _ in range(choices)],
        "formatted": final is not None,
    }
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    room = max_length - len(prompt)
    if room < 1:
        raise BadRequest(f"the prompt is {len(prompt)} tokens; this server's context holds {max_length}")
    settings["max_tokens"] = min(DEFAULT_MAX_TOKENS, room) if limit is None else int(_number(
        {"max_tokens": limit}, "max_tokens", 0, 1, room,
        f"the prompt is {len(prompt)} tokens, so at most {room} more fit in this server's {max_length}-token "
        "context"))
    return prompt, settings


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


def _number(body: dict, name: str, default, low, high, hint: str = "") -> float:
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
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise BadRequest(f"logit_bias: expected an object of at most {MAX_LOGIT_BIAS} token ids, got {bias!r}")
    vocabulary = tok.get_encoding().n_vocab
    parsed = {}
    for token in bias:
        if not (str(token).isdigit() and int(token) < vocabulary):
            raise BadRequest(f"logit_bias: {token!r} is not a token id in [0, {vocabulary})")
        name = f"logit_bias[{token!r}]"
        parsed[int(token)] = _number({name: bias[token]}, name, 0, -100, 100)
    return parsed


def _stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise BadRequest("stop: a string or a list of up to 4 non-empty strings")
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

    def feed(self, token: int) -> dict[str, str]:
        """The new text of this token by field (reasoning_content, content), up to any stop string. Content that
        may be the start of a stop string is held back until the next tokens tell (then, or at `rest`)."""
        self.parser.feed(token)
        current, delta = self.parser.current, self.parser.delta
        if not delta or current is None or self.stopped:
            return {}
        if current.channel == "analysis":
            self.reasoning += delta
            return {"reasoning_content": delta, "reasoning": delta}
        if current.recipient is not None:  # a tool call's arguments: reported whole at the end
            return {}
        if self.final_only and current.channel != "final":  # a preamble would break the formatted answer
            return {}
        self.content += delta
        for stop in self.stops:
            if stop in self.content:
                self.content, self.stopped = self.content[: self.content.index(stop)], True
        held = 0 if self.stopped else max((k for stop in self.stops for k in range(1, len(stop))
                                          if self.content.endswith(stop[:k])), default=0)
        return self._hand_out(len(self.content) - held)

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


def _logprob(token: int, logprob: float) -> dict:
    """One generated token as OpenAI reports it (its text, UTF-8 bytes and log probability)."""
    raw = tok.get_encoding().decode_single_token_bytes(token)
    return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw), "logprob": logprob,
            "top_logprobs": []}


def _int32(seed: int) -> int:
    return (seed + (1 << 31)) % (1 << 32) - (1 << 31)


def _finish_reason(reason: str, calls: list[dict], stopped: bool) -> str:
    if calls:
        return "tool_calls"
    return "stop" if stopped or reason in ("stop", "cancelled") else "length"


# ---- the app --------------------------------------------------------------------------------------------------


def create_app(engine: Engine, model_name: str):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    async def completions(request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error(400, f"the request body is not valid JSON: {exc}")
        try:
            prompt, settings = parse_request(body, engine.max_length)
        except BadRequest as exc:
            return error(400, str(exc))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()  # (choice, "token" | "done", value) from the engine thread

        def job(index: int) -> Request:
            def put(kind):
                return lambda *value: loop.call_soon_threadsafe(events.put_nowait, (index, kind, value))

            return Request(prompt, settings["max_tokens"], settings["temperature"], settings["top_p"],
                           settings["top_k"], _int32(settings["seed"] + index), DEFAULT_STOP_TOKENS,
                           settings["presence_penalty"], settings["frequency_penalty"], settings["logit_bias"],
                           on_token=put("token"), on_done=put("done"), constraint=settings["constraints"][index])

        jobs = [job(index) for index in range(settings["n"])]  # the engine prefills their shared prompt once
        try:
            for submitted in jobs:
                engine.submit(submitted)
        except ValueError as exc:
            return error(400, str(exc))
        completions = [Completion(settings["stop"], settings["tool_calls"], settings["formatted"]) for _ in jobs]
        identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        logprobs = [[] for _ in jobs]
        reasons: dict[int, str] = {}  # each choice's end, as the engine reported it

        async def outcome():
            """Yields (choice, its deltas, None) per token, and (choice, None, finish reason) at its end."""
            while len(reasons) < len(jobs):
                index, kind, value = await events.get()
                if kind == "done":
                    reasons[index] = value[0]
                    yield index, None, value[0]
                    continue
                token, logprob = value
                logprobs[index].append(_logprob(token, logprob))
                completion = completions[index]
                stopped = completion.stopped
                delta = completion.feed(token)
                if completion.stopped and not stopped:
                    engine.cancel(jobs[index])
                if delta:
                    yield index, delta, None

        def usage():
            generated = sum(len(j.tokens) for j in jobs)  # the prompt counts once, as OpenAI bills n choices
            return {"prompt_tokens": len(prompt), "completion_tokens": generated,
                    "total_tokens": len(prompt) + generated}

        def release():
            """A client that leaves before the end frees its slots (the engine would decode on for nobody)."""
            for index, unfinished in enumerate(jobs):
                if index not in reasons:
                    engine.cancel(unfinished)

        if not settings["stream"]:
            async def leaving():
                while not await request.is_disconnected():
                    await asyncio.sleep(0.1)
                release()

            watcher = asyncio.create_task(leaving())
            try:
                async for _ in outcome():
                    pass
            finally:
                watcher.cancel()
            failed = [reason for reason in reasons.values() if reason.startswith("error")]
            if failed:
                return error(500, f"generation failed: {failed[0]}", "server_error")
            choices = []
            for index, completion in enumerate(completions):
                calls = completion.tool_calls()
                message = {"role": "assistant", "content": completion.content or (None if calls else ""),
                           "reasoning_content": completion.reasoning or None,
                           "reasoning": completion.reasoning or None}
                if calls:
                    message["tool_calls"] = calls
                choices.append({"index": index, "message": message,
                                "finish_reason": _finish_reason(reasons[index], calls, completion.stopped),
                                "logprobs": {"content": logprobs[index]} if settings["logprobs"] else None})
            return JSONResponse({**identity, "object": "chat.completion", "usage": usage(), "choices": choices})

        async def events_stream():
            def chunk(index, delta, finish=None, **extra):
                payload = {**identity, "object": "chat.completion.chunk", **extra,
                           "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
                return f"data: {json.dumps(payload)}\n\n"

            try:
                for index in range(len(jobs)):
                    yield chunk(index, {"role": "assistant", "content": ""})
                async for index, delta, reason in outcome():
                    if delta is not None:
                        yield chunk(index, delta)
                        continue
                    completion = completions[index]
                    if rest := completion.rest():
                        yield chunk(index, rest)
                    calls = completion.tool_calls()
                    if calls:
                        yield chunk(index, {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
                    yield chunk(index, {}, _finish_reason(reason, calls, completion.stopped))
                if (body.get("stream_options") or {}).get("include_usage"):  # a last chunk with no choices
                    last = {**identity, "object": "chat.completion.chunk", "choices": [], "usage": usage()}
                    yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also when the client disconnects, which closes this generator
                release()

        return StreamingResponse(events_stream(), media_type="text/event-stream")

    async def models(_request):
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                                          "owned_by": "gptoss-jax"}]})

    async def health(_request):
        return JSONResponse({"status": "ok", "busy_slots": len(engine.active), "slots": engine.slots})

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"]),
                             Route("/health", health, methods=["GET"])])


def run(args) -> int:
    """`gptoss-jax serve`: process 0 serves HTTP; every process runs the engine's steps."""
    import jax

    from gptoss_jax import chat

    model = chat.start(args)
    engine = Engine(model, slots=args.slots, max_length=args.max_context)
    if jax.process_index() != 0:
        engine.follow()
        return 0
    import uvicorn

    name = args.served_model_name or Path(args.checkpoint).name
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal: make SIGTERM, like SIGINT, an
    # exception here, so the engine stops (and releases the other processes) before the interpreter exits.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    engine.start()
    try:
        uvicorn.run(create_app(engine, name), host=args.host, port=args.port, log_level="warning")
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()
    return 0
