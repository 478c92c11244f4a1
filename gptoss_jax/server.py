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
import contextlib
import json
import logging
import secrets
import signal
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gptoss_jax import agent, completions, inference, responses
from gptoss_jax.engine import Engine
from gptoss_jax.protocol import BadRequest, Choice, Completion, finish_reason, parse_request, token_logprob

log = logging.getLogger(__name__)
# Each slot's cache indices at start: the cache grows (in powers of two, up to --max-context) only when a request
# needs more, so a long --max-context costs nothing until it is used.
STARTING_CAPACITY = 1024

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


def create_app(engine: Engine, model_names: Sequence[str], server_tools: Sequence[str] = (),
               make_tools: Callable[[Sequence[str]], agent.Toolset] | None = None, max_turns: int = 16, *,
               api_key: str | None = None, max_request_bytes: int = 16 * 2**20):
    """The ASGI app. `model_names`: the ids a request's `model` may name (none named: the first, which responses
    report; another: 404, as vLLM answers). `server_tools`: the built-in tools this server runs when a request
    enables them, each conversation's made by `make_tools(names)` (`agent.builtin_tools`), up to `max_turns`
    generations each.
    `api_key`: every /v1/ request must carry `Authorization: Bearer <api_key>` (401 otherwise), as OpenAI's and
    vLLM's servers ask. Request bodies past `max_request_bytes` are refused (413); a request is parsed and
    tokenized on a worker thread, so a large one does not hold up the others (or /health)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    model_name = model_names[0]

    def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
              code: str | None = None) -> JSONResponse:
        """OpenAI's error body: `param` the request field at fault, `code` a short string (or null)."""
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                            status_code=status)

    class Authorized:
        """ASGI middleware: the API key on every /v1/ path."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if api_key and scope["type"] == "http" and scope["path"].startswith("/v1/"):
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not secrets.compare_digest(given, f"Bearer {api_key}".encode()):
                    response = error(401, "a valid API key is required (Authorization: Bearer KEY)",
                                     "authentication_error", code="invalid_api_key")
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
        asked = body.get("model") if isinstance(body, dict) else None
        if isinstance(asked, str) and asked not in model_names:  # another type: the parser's 400
            return None, None, error(404, f"The model `{asked}` does not exist; this server serves "
                                     f"{', '.join(model_names)}", param="model", code="model_not_found")
        try:
            return body, await asyncio.get_running_loop().run_in_executor(None, parse, body, *args), None
        except BadRequest as exc:
            return None, None, error(400, str(exc), param=exc.param)

    @contextlib.asynccontextmanager
    async def watched(request, release: Callable[[], None]):
        """While a whole (not streamed) answer is made: a client that leaves calls `release`, which frees its slots
        (the engine would decode on for nobody); so does the end, however it comes."""
        async def leaving():
            while not await request.is_disconnected():
                await asyncio.sleep(0.1)
            release()

        watcher = asyncio.create_task(leaving())
        try:
            yield
        finally:
            watcher.cancel()
            release()

    async def ended(request, outcome: Callable, release: Callable[[], None]) -> tuple[dict, JSONResponse | None]:
        """Each choice's end reason once `outcome()` has yielded them all (index, delta, reason; a client that
        leaves releases its choices first), and the 500 of a failed one, if any."""
        async with watched(request, release):
            reasons = {index: reason async for index, delta, reason in outcome() if delta is None}
        failed = [reason for reason in reasons.values() if reason.startswith("error")]
        return reasons, error(500, f"generation failed: {failed[0]}", "server_error") if failed else None

    # A python call may take its whole wall-time limit: tool calls get threads of their own, one per slot.
    tool_threads = concurrent.futures.ThreadPoolExecutor(engine.slots, thread_name_prefix="tool-call")

    async def chat_completions(request):
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
                    token, logprob, top = value
                    stopped = completion.stopped
                    delta = completion.feed(token)
                    if settings["logprobs"] and completion.in_content:  # the tokens of `content`, as OpenAI's
                        logprobs[index].append(token_logprob(token, logprob, top))
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
            reasons, failed = await ended(request, outcome, release)
            if failed:
                return failed
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
            reported = [0] * len(choices)  # logprobs each choice's chunks have carried

            def chunk(index, delta, finish=None):
                choice = {"index": index, "delta": delta, "finish_reason": finish}
                if settings["logprobs"]:  # those of the content's tokens since the last chunk
                    choice["logprobs"] = {"content": logprobs[index][reported[index]:]}
                    reported[index] = len(logprobs[index])
                payload = {**identity, "object": "chat.completion.chunk", "choices": [choice]}
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
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                          "owned_by": "gptoss-jax", "max_model_len": engine.max_length}
                                                         for name in model_names]})

    async def health(_request):
        return JSONResponse({"status": "ok", "busy_slots": len(engine.active), "slots": engine.slots})

    async def not_found(request, exc):  # unknown paths and methods answer in the API's error format too
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                     code="unknown_url" if exc.status_code == 404 else "method_not_allowed")

    return Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                             *responses.routes(engine, model_name, server_tools, make_tools, max_turns, error,
                                               tool_threads, parsed, watched),
                             *completions.routes(engine, model_name, error, parsed, ended),
                             Route("/v1/models", models, methods=["GET"]),
                             Route("/health", health, methods=["GET"])],
                     middleware=[Middleware(Authorized)], exception_handlers={404: not_found, 405: not_found})


def run(args) -> int:
    """`gptoss-jax serve`: process 0 serves HTTP; every process runs the engine's steps."""
    import jax


    tool_names = inference.tool_names(args)
    make_tools = agent.builtin_tools(tool_names, browser_docs=args.browser_docs,
                                     unsafe_python=args.unsafe_python_tool) if tool_names else None
    model = inference.start(args)
    engine = Engine(model, slots=args.slots, max_length=args.max_context,
                    capacity=min(STARTING_CAPACITY, args.max_context or STARTING_CAPACITY))
    if jax.process_index() != 0:
        engine.follow()
        return 0
    import uvicorn

    names = args.served_model_name or [Path(args.checkpoint).name]
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal: make SIGTERM, like SIGINT, an
    # exception here, so the engine stops (and releases the other processes) before the interpreter exits.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    engine.start()
    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("SERVING ON %s WITHOUT AN API KEY: anyone who can reach this port can use the model%s. Pass "
                    "--api-key (or set GPTOSS_API_KEY), or serve on 127.0.0.1.", args.host,
                    " and run code in its python tool" if "python" in tool_names else "")
    log.info("serving %s as %s on http://%s:%d/v1: %d slots, %d tokens of context each%s", args.checkpoint,
             ", ".join(names), args.host, args.port, engine.slots, engine.max_length,
             f", built-in tools: {', '.join(tool_names)}" if tool_names else "")
    try:  # uvicorn logs each request (its access log) and, when it is listening, where
        uvicorn.run(create_app(engine, names, tool_names, make_tools, args.max_turns, api_key=args.api_key,
                               max_request_bytes=args.max_request_bytes), host=args.host, port=args.port,
                    log_level="info")
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()
    return 0
