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
import concurrent.futures
import json
import logging
import secrets
import signal
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gptoss_jax import agent, inference, responses
from gptoss_jax.engine import Engine
from gptoss_jax.protocol import BadRequest, Choice, Completion, finish_reason, parse_request, token_logprob

log = logging.getLogger(__name__)

class _Refused(Exception):
    """A request turned away before it is parsed: its HTTP status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_json(request, max_bytes: int) -> Any:
    """The request's body as JSON, read no further than `max_bytes` (413 past it); a body that is not JSON is a
    400, and a client that leaves while sending it is dropped quietly (None)."""
    from starlette.requests import ClientDisconnect

    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise _Refused(413, f"the request body is {length} bytes; this server takes at most {max_bytes}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _Refused(413, f"the request body is over {max_bytes} bytes, the most this server takes")
            chunks.append(chunk)
    except ClientDisconnect:
        return None
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _Refused(400, f"the request body is not valid JSON: {exc}") from None


def create_app(engine: Engine, model_name: str, server_tools: Sequence[str] = (),
               make_tools: Callable[[Sequence[str]], agent.Toolset] | None = None, max_turns: int = 16, *,
               api_key: str | None = None, max_request_bytes: int = 16 * 2**20):
    """The ASGI app. `server_tools`: the built-in tools this server runs when a request enables them, each
    conversation's made by `make_tools(names)` (`agent.builtin_tools`), up to `max_turns` generations each.
    `api_key`: every /v1/ request must carry `Authorization: Bearer <api_key>` (401 otherwise), as OpenAI's and
    vLLM's servers ask. Request bodies past `max_request_bytes` are refused (413); a request is parsed and
    tokenized on a worker thread, so a large one does not hold up the others (or /health)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    class Authorized:
        """ASGI middleware: the API key on every /v1/ path."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if api_key and scope["type"] == "http" and scope["path"].startswith("/v1/"):
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not secrets.compare_digest(given, f"Bearer {api_key}".encode()):
                    response = error(401, "a valid API key is required (Authorization: Bearer KEY)",
                                     "authentication_error")
                    return await response(scope, receive, send)
            await self.app(scope, receive, send)

    async def parsed(request, parse: Callable, *args) -> tuple[Any, Any, JSONResponse | None]:
        """(the body, what `parse(body, *args)` returns, None), or (None, None, the error response): the body read
        within its limit, then parsed (and its prompt tokenized) off the event loop."""
        try:
            body = await read_json(request, max_request_bytes)
        except _Refused as refused:
            return None, None, error(refused.status, str(refused))
        if body is None:  # the client left
            return None, None, error(400, "the client closed the connection before its request was read")
        try:
            return body, await asyncio.get_running_loop().run_in_executor(None, parse, body, *args), None
        except BadRequest as exc:
            return None, None, error(400, str(exc))

    # A python call may take its whole wall-time limit: tool calls get threads of their own, one per slot.
    tool_threads = concurrent.futures.ThreadPoolExecutor(engine.slots, thread_name_prefix="tool-call")

    async def completions(request):
        body, result, refused = await parsed(request, parse_request, engine.max_length, server_tools)
        if refused is not None:
            return refused
        prompt, settings = result
        settings["max_turns"] = max_turns
        events: asyncio.Queue = asyncio.Queue()  # (choice, "token" | "tool" | "done", value)
        choices = [Choice(engine, prompt, settings, index, events, make_tools, tool_threads)
                   for index in range(settings["n"])]
        try:
            for choice in choices:  # submitted together: the engine prefills their shared prompt once
                choice.start()
        except ValueError as exc:
            for choice in choices:
                choice.cancel()
            return error(400, str(exc))
        completions = [Completion(settings["stop"], settings["tool_calls"], settings["formatted"]) for _ in choices]
        identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        logprobs = [[] for _ in choices]

        async def outcome():
            """Yields (choice, its deltas, None) per token, and (choice, None, finish reason) at its end."""
            ended = 0
            while ended < len(choices):
                index, kind, value = await events.get()
                completion = completions[index]
                if kind == "done":
                    ended += 1
                    yield index, None, value
                elif kind == "tool":
                    completion.new_turn()
                else:
                    token, logprob = value
                    if settings["logprobs"]:
                        logprobs[index].append(token_logprob(token, logprob))
                    stopped = completion.stopped
                    delta = completion.feed(token)
                    if completion.stopped and not stopped:
                        choices[index].cancel()
                    if delta:
                        yield index, delta, None

        def usage():
            generated = sum(c.turns.generated for c in choices)  # the prompt counts once, as OpenAI bills n choices
            return {"prompt_tokens": len(prompt), "completion_tokens": generated,
                    "total_tokens": len(prompt) + generated}

        def release():
            """A client that leaves before the end frees its slots (the engine would decode on for nobody)."""
            for choice in choices:
                choice.cancel()

        if not settings["stream"]:
            async def leaving():
                while not await request.is_disconnected():
                    await asyncio.sleep(0.1)
                release()

            watcher = asyncio.create_task(leaving())
            try:
                reasons = {index: reason async for index, delta, reason in outcome() if delta is None}
            finally:
                watcher.cancel()
                release()
            failed = [reason for reason in reasons.values() if reason.startswith("error")]
            if failed:
                return error(500, f"generation failed: {failed[0]}", "server_error")
            answers = []
            for index, completion in enumerate(completions):
                calls = completion.tool_calls()
                message = {"role": "assistant", "content": completion.content or (None if calls else ""),
                           "reasoning_content": completion.reasoning or None,
                           "reasoning": completion.reasoning or None}
                if calls:
                    message["tool_calls"] = calls
                answers.append({"index": index, "message": message,
                                "finish_reason": finish_reason(reasons[index], calls, completion.stopped),
                                "logprobs": {"content": logprobs[index]} if settings["logprobs"] else None})
            return JSONResponse({**identity, "object": "chat.completion", "usage": usage(), "choices": answers})

        async def events_stream():
            def chunk(index, delta, finish=None, **extra):
                payload = {**identity, "object": "chat.completion.chunk", **extra,
                           "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
                return f"data: {json.dumps(payload)}\n\n"

            try:
                for index in range(len(choices)):
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
                    yield chunk(index, {}, finish_reason(reason, calls, completion.stopped))
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

    async def not_found(request, exc):  # unknown paths and methods answer in the API's error format too
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                             *responses.routes(engine, model_name, server_tools, make_tools, max_turns, error,
                                               tool_threads, parsed),
                             Route("/v1/models", models, methods=["GET"]),
                             Route("/health", health, methods=["GET"])],
                     middleware=[Middleware(Authorized)], exception_handlers={404: not_found, 405: not_found})


def run(args) -> int:
    """`gptoss-jax serve`: process 0 serves HTTP; every process runs the engine's steps."""
    import jax


    names = inference.tool_names(args)
    make_tools = agent.builtin_tools(names, browser_docs=args.browser_docs,
                                     unsafe_python=args.unsafe_python_tool) if names else None
    model = inference.start(args)
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
    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("SERVING ON %s WITHOUT AN API KEY: anyone who can reach this port can use the model%s. Pass "
                    "--api-key (or set GPTOSS_API_KEY), or serve on 127.0.0.1.", args.host,
                    " and run code in its python tool" if "python" in names else "")
    try:
        uvicorn.run(create_app(engine, name, names, make_tools, args.max_turns, api_key=args.api_key,
                               max_request_bytes=args.max_request_bytes), host=args.host, port=args.port,
                    log_level="warning")
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()
    return 0
