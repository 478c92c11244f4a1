"""The legacy text completions API on `gptoss-jax serve`: `POST /v1/completions`, as OpenAI and vLLM serve it.

Text in, text out, with no harmony rendering: a `prompt` (a text, token ids, or a list of either for several
prompts) is tokenized as it is (special tokens such as `<|start|>` written in it are those tokens) and continued
until `max_tokens` (default 16, as OpenAI's), a stop string, or `<|return|>` / `<|call|>` (which end the text and
are not in it). `logprobs: k` reports each generated token's log probability and the k most likely tokens (plus
the chosen one) at its position; with `echo` the prompt comes back before the completion, and with `logprobs` its
tokens are scored too (the first has nothing before it: null) — what harnesses such as lm-eval's
`local-completions` read for loglikelihood (multiple-choice) tasks.

Beside it, vLLM's tokenizer endpoints: `POST /tokenize` (a text's token ids, as a prompt is tokenized here),
`POST /detokenize` and `GET /tokenizer_info`, which lm-eval finds and uses to count the tokens it scores exactly as
this server does (no tokenizer of its own to configure).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from gptoss_jax import harmony
from gptoss_jax import tokenizer as tok
from gptoss_jax.engine import MAX_TOP_LOGPROBS, Request
from gptoss_jax.generation import DEFAULT_STOP_TOKENS
from gptoss_jax.protocol import BadRequest, as_int32, budget, check_fields, cut_at_stop, number, sampling

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 16  # OpenAI's, for this API
MAX_STOPS = 32  # stop strings a request may give (harnesses send a task's own plus the end of text)
MAX_PROMPTS = 64
# Each field read, with its JSON type in OpenAI's API reference (`top_k`: vLLM's); see protocol.check_fields.
_FIELDS = {"model": "string", "prompt": "string|array", "max_tokens": "integer", "temperature": "number",
           "top_p": "number", "top_k": "integer", "n": "integer", "stream": "boolean", "stream_options": "object",
           "logprobs": "integer", "echo": "boolean", "stop": "string|array", "seed": "integer",
           "presence_penalty": "number", "frequency_penalty": "number", "logit_bias": "object"}
_LABELS = {"user": "string"}
# Honoured only at the value that changes nothing; any other value is a 400 naming the field.
_NEUTRAL = {"suffix": (None, ""), "best_of": (None, 1)}
# vLLM's tokenizer endpoints' fields (the o200k_harmony encoding adds no special tokens: either value of
# add_special_tokens gives the same ids).
_TOKENIZE = {"model": "string", "prompt": "string", "add_special_tokens": "boolean"}
_DETOKENIZE = {"model": "string", "tokens": "array"}


def parse(body: Any, max_length: int) -> tuple[list[list[int]], dict[str, Any]]:
    """(the prompts' tokens, generation settings) of a text completion request."""
    check_fields(body, _FIELDS, _LABELS, _NEUTRAL)
    prompts = _prompts(body.get("prompt"))
    settings = sampling(body, max_stops=MAX_STOPS)
    echo = bool(body.get("echo", False))
    logprobs = body.get("logprobs")
    settings.update({"echo": echo, "logprobs": None if logprobs is None else int(number(
        body, "logprobs", 0, 0, MAX_TOP_LOGPROBS))})
    longest = max(map(len, prompts))
    if longest >= max_length:
        raise BadRequest(f"prompt: {longest} tokens; this server's context holds {max_length}, new tokens included")
    # 0 new tokens: only the prompt, scored (echo with logprobs)
    settings["max_tokens"] = budget(body.get("max_tokens"), "max_tokens", max_length - longest, DEFAULT_MAX_TOKENS,
                                    least=0 if echo else 1)
    return prompts, settings


def _prompts(prompt: Any) -> list[list[int]]:
    """A text, a list of token ids, or a non-empty list of either: each a prompt, tokenized."""
    if prompt is None:
        raise BadRequest("prompt: required")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompts = [_tokens(prompt, "prompt")]
    elif not prompt or len(prompt) > MAX_PROMPTS:
        raise BadRequest(f"prompt: expected 1 to {MAX_PROMPTS} prompts, got {len(prompt)}")
    else:
        prompts = [_tokens(item, f"prompt[{index}]") for index, item in enumerate(prompt)]
    for index, tokens in enumerate(prompts):
        if not tokens:
            raise BadRequest(f"prompt{f'[{index}]' if len(prompts) > 1 else ''}: empty; a completion continues at "
                             "least one token")
    return prompts


def _tokens(item: Any, where: str) -> list[int]:
    """A text, tokenized as it is (the special tokens written in it are those tokens), or token ids, checked."""
    encoding = tok.get_encoding()
    if isinstance(item, str):
        return encoding.encode(item, allowed_special="all")
    if not (isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)):
        raise BadRequest(f"{where}: expected a text or a list of token ids")
    if any(not 0 <= t < encoding.n_vocab for t in item):
        raise BadRequest(f"{where}: token ids must be in [0, {encoding.n_vocab})")
    return item


def _tokenize(body: Any) -> list[int]:
    check_fields(body, _TOKENIZE, {}, {})
    return _tokens(body.get("prompt") or "", "prompt")


def _detokenize(body: Any) -> str:
    check_fields(body, _DETOKENIZE, {}, {})
    return tok.get_encoding().decode(_tokens(body.get("tokens") or [], "tokens"))


class Text:
    """One choice's text as its tokens come: the echoed prompt (`prefix`), then the generated text, decoded
    incrementally and cut at the earliest stop string in it (held back while it may be the start of one; the
    prompt is never searched), with each token's offset and log probabilities for `logprobs`."""

    def __init__(self, stops: Sequence[str], prefix: str = ""):
        self.stops, self.prefix, self.generated, self.sent, self.stopped = stops, prefix, "", 0, False
        self.tokens: list[str] = []
        self.offsets: list[int] = []
        self.logprobs: list[float | None] = []
        self.top: list[dict[str, float] | None] = []
        self.reported = 0  # tokens whose logprobs a streamed chunk has carried
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add_scored(self, token: int, logprob: float | None, top: Sequence[tuple[int, float]] | None,
                   offset: int) -> None:
        """A token with its logprobs (of the prompt, or generated), starting at `offset` of the text."""
        self.tokens.append(token_text(token))
        self.offsets.append(offset)
        self.logprobs.append(logprob)
        self.top.append(None if top is None else {**{token_text(t): v for t, v in top}, token_text(token): logprob})

    @property
    def text(self) -> str:
        return self.prefix + self.generated

    def feed(self, token: int, logprob: float, top: Sequence[tuple[int, float]]) -> str:
        """The text this generated token hands out now (stop strings held back). The stop token that ends the
        completion is not in the text, but is in the logprobs (harnesses count on one entry per token)."""
        if self.stopped:
            return ""
        start, held = len(self.generated), 0
        if token not in DEFAULT_STOP_TOKENS:
            self.generated, self.stopped, held = cut_at_stop(
                self.generated + self._decoder.decode(_bytes(token)), self.stops)
        if start < len(self.generated) or not self.stopped:  # a token cut away by a stop string is not reported
            self.add_scored(token, logprob, top, len(self.prefix) + start)
        return self.rest(held)

    def end(self) -> None:
        """The generation ended: bytes of a character it did not finish become U+FFFD, as the tokens show them."""
        if not self.stopped:
            self.generated += self._decoder.decode(b"", final=True)

    def rest(self, held: int = 0) -> str:
        end = len(self.text) - held
        text, self.sent = self.text[self.sent:end], max(self.sent, end)
        return text

    def logprobs_object(self, start: int = 0) -> dict:
        """The legacy API's logprobs of the tokens from `start` on."""
        return {"tokens": self.tokens[start:], "token_logprobs": self.logprobs[start:],
                "top_logprobs": self.top[start:], "text_offset": self.offsets[start:]}

    def unreported(self) -> dict:
        """The logprobs of the tokens no streamed chunk has carried yet."""
        start, self.reported = self.reported, len(self.tokens)
        return self.logprobs_object(start)


def _bytes(token: int) -> bytes:
    return tok.get_encoding().decode_single_token_bytes(token)


def token_text(token: int) -> str:
    """A token as the legacy API names it: its text, or, for bytes that are not UTF-8 text alone (part of a
    character), `bytes:` and their escapes, as vLLM writes them (distinct tokens, distinct names)."""
    raw = _bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)


def routes(engine, model_name: str, error: Callable, parsed: Callable, ended: Callable) -> list:
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def create(request):
        body, result, refused = await parsed(request, parse, engine.max_length)
        if refused is not None:
            return refused
        prompts, settings = result
        top = settings["logprobs"]
        scored = settings["echo"] and top is not None
        try:  # the prompts' own logprobs, each scored once however many choices it has
            scores = [await asyncio.get_running_loop().run_in_executor(None, engine.score, prompt, top)
                      for prompt in prompts] if scored else None
        except ValueError as exc:
            return error(400, str(exc))
        except Exception as exc:  # noqa: BLE001 - e.g. out of device memory: the API's 500, and the server goes on
            log.exception("scoring a prompt failed")
            return error(500, f"scoring the prompt failed: {type(exc).__name__}: {exc}", "server_error")
        count = settings["n"]
        texts, events = [], asyncio.Queue()  # events: (index, token, logprob, top) and (index, None, reason)
        requests = []
        for index in range(len(prompts) * count):
            prompt = prompts[index // count]
            text = Text(settings["stop"], tok.get_encoding().decode(prompt) if settings["echo"] else "")
            if scored:  # the first token has nothing before it to be scored after
                logprobs, alternatives = scores[index // count]
                decoder, offset = codecs.getincrementaldecoder("utf-8")(errors="replace"), 0
                for position, token in enumerate(prompt):
                    text.add_scored(token, logprobs[position - 1] if position else None,
                                    alternatives[position - 1] if position else None, offset)
                    offset += len(decoder.decode(_bytes(token)))
            texts.append(text)
            if settings["max_tokens"]:
                requests.append(_request(prompt, settings, index, events))
            else:
                events.put_nowait((index, None, "length"))
        try:
            for item in requests:  # submitted together: a prompt shared by n choices is prefilled once
                engine.submit(item)
        except ValueError as exc:
            for item in requests:
                engine.cancel(item)
            return error(400, str(exc))

        def release():
            for item in requests:
                engine.cancel(item)

        async def outcome():
            """Yields (index, text handed out) per token and (index, None) at a choice's end, with its reason."""
            finished, reasons = 0, {}
            while finished < len(texts):
                index, token, *value = await events.get()
                if token is None:
                    finished += 1
                    texts[index].end()
                    reasons[index] = "stop" if texts[index].stopped else value[0]
                    yield index, None, reasons[index]
                else:
                    was_stopped = texts[index].stopped
                    delta = texts[index].feed(token, *value)
                    if texts[index].stopped and not was_stopped:
                        engine.cancel(requests[index])
                    yield index, delta, None

        def usage():
            generated = sum(len(item.tokens) for item in requests)
            prompt_tokens = sum(map(len, prompts))
            return {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                    "total_tokens": prompt_tokens + generated}

        identity = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": model_name}

        def choice(index, text, reason):
            return {"index": index, "text": text, "finish_reason": reason,
                    "logprobs": texts[index].logprobs_object() if top is not None else None}

        if not settings["stream"]:
            reasons, failed = await ended(request, outcome, release)
            if failed:
                return failed
            return JSONResponse({**identity, "usage": usage(), "choices": [
                choice(index, text.text, _finish(reasons[index])) for index, text in enumerate(texts)]})

        async def stream():
            def chunk(index, text, reason=None):
                logprobs = texts[index].unreported() if top is not None else None
                payload = {**identity, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                                    "finish_reason": reason}]}
                return f"data: {json.dumps(payload)}\n\n"

            try:
                if settings["echo"]:
                    for index, text in enumerate(texts):
                        yield chunk(index, text.rest())
                async for index, delta, reason in outcome():
                    if delta is None:
                        yield chunk(index, texts[index].rest(), _finish(reason))
                    elif delta:
                        yield chunk(index, delta)
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield f"data: {json.dumps({**identity, 'choices': [], 'usage': usage()})}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also when the client leaves
                release()

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def tokenize(request):
        _, tokens, refused = await parsed(request, _tokenize)
        if refused is not None:
            return refused
        return JSONResponse({"count": len(tokens), "max_model_len": engine.max_length, "tokens": tokens})

    async def detokenize(request):
        _, text, refused = await parsed(request, _detokenize)
        return refused or JSONResponse({"prompt": text})

    async def tokenizer_info(_request):  # as the exports' tokenizer files: special tokens, the chat template
        return JSONResponse({"tokenizer_class": "tiktoken", "encoding": tok.get_encoding().name,
                             "eos_token": "<|return|>", "bos_token": tok.BOS, "pad_token": tok.PAD,
                             "model_max_length": engine.max_length, "chat_template": harmony.chat_template()})

    return [Route("/v1/completions", create, methods=["POST"]), Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
            Route("/tokenizer_info", tokenizer_info, methods=["GET"])]


def _request(prompt: list[int], settings: dict, index: int, events: asyncio.Queue) -> Request:
    loop = asyncio.get_running_loop()
    top = settings["logprobs"]
    return Request(list(prompt), settings["max_tokens"], settings["temperature"], settings["top_p"],
                   settings["top_k"], as_int32(settings["seed"] + index), DEFAULT_STOP_TOKENS,
                   settings["presence_penalty"], settings["frequency_penalty"], settings["logit_bias"],
                   logprobs=top is not None, top_logprobs=top or 0,
                   on_token=lambda token, logprob, alternatives: loop.call_soon_threadsafe(
                       events.put_nowait, (index, token, logprob, alternatives)),
                   on_done=lambda reason: loop.call_soon_threadsafe(events.put_nowait, (index, None, reason)))


def _finish(reason: str) -> str:
    return "stop" if reason in ("stop", "cancelled") else "length"
