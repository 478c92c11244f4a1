"""Where an eval's completions come from: the in-process JAX model (the engine, through `Generator.generate`, a
chunk of samples at a time) or any OpenAI-compatible chat endpoint (`gptoss-jax serve`, vLLM, ...), asked with
`reasoning_effort`.

Both return, per request, the analysis and final texts and a harmony rendering of the reply, so graders and
metrics do not depend on the backend: token counts are the o200k_harmony encodings of the texts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import zlib
from collections.abc import Callable, Sequence

from gptoss_jax import constrain, harmony
from gptoss_jax import tokenizer as tok


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: str  # the user message
    effort: str  # low | medium | high
    seed: int  # sampling seed of this sample
    response_format: dict | None = None  # OpenAI's response_format for the final answer (None: free text)
    tools: tuple[str, ...] = ()  # built-in tools the model may call ("python", "browser")


@dataclasses.dataclass(frozen=True)
class Reply:
    analysis: str = ""
    final: str = ""
    output: str = ""  # the assistant's reply as harmony text
    completion_tokens: int = 0  # tokens generated (as the backend counts them)
    truncated: bool = False  # stopped by max_tokens
    error: str | None = None  # the generation failed; the sample is recorded as failed
    tool_calls: tuple[dict, ...] = ()  # built-in calls made: {"recipient", "input", "output"}


class BackendError(RuntimeError):
    """A backend that cannot start (unreachable endpoint, missing package); the message says which and why."""


def seed_of(*parts: object) -> int:
    """A stable 31-bit seed from the parts (task, effort, problem, sample, ...)."""
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF


def _reply_text(analysis: str, final: str, stop: str) -> str:
    """The reply as the model writes it after `<|start|>assistant`."""
    text = f"<|channel|>analysis<|message|>{analysis}<|end|><|start|>assistant" if analysis else ""
    return text + f"<|channel|>final<|message|>{final}{stop}"


class JaxBackend:
    """The model in this process; each chunk of requests runs through the engine (`Generator.generate`): `slots`
    rows decode at once (None: the whole chunk), the others taking the slots finished rows free, each row sampled
    with its request's own seed (so what a sample draws does not depend on the chunk it falls in, nor on its
    slot). Requests with built-in tools run the agent loop instead (a python kernel per sample); `max_tokens` then
    bounds each of its generations, `max_turns` their number."""

    def __init__(self, generator, *, max_tokens: int, temperature: float, top_p: float, slots: int | None = None,
                 max_turns: int = 16, browser_docs: str | None = None, unsafe_python_tool: bool = False):
        self.generator = generator  # a gptoss_jax.generation.Generator
        self.max_tokens, self.temperature, self.top_p, self.slots = max_tokens, temperature, top_p, slots
        self.max_turns, self.browser_docs, self.unsafe_python_tool = max_turns, browser_docs, unsafe_python_tool
        self._tool_makers = {}  # by the tools' names: checked (sandbox, document index) once, not per sample
        self.describe = f"in-process JAX model ({generator.model.config.num_hidden_layers} layers)"

    def __call__(self, requests: Sequence[Request], finished: Callable[[], None] | None = None) -> list[Reply]:
        """The replies, in order; `finished()` is called as each row of the batch ends its reply (a row cut by
        max_tokens, or a conversation with tools, only when the whole batch returns: the caller counts those)."""
        records = [{"messages": [{"role": "user", "content": r.prompt}], "reasoning_effort": r.effort,
                    "response_format": r.response_format, "builtin_tools": list(r.tools)} for r in requests]
        if any(r.tools for r in requests):
            return self._with_tools(requests, records)
        prompts = [harmony.encode_chat(record) for record in records]
        finals = [constrain.for_response_format(r.response_format) for r in requests]
        stream = (lambda row, token: token in (tok.RETURN, tok.CALL) and finished()) if finished else None
        try:
            outputs = self.generator.generate(prompts, self.max_tokens, temperature=self.temperature,
                                              top_p=self.top_p, seed=[r.seed for r in requests], stream=stream,
                                              slots=self.slots,
                                              constraints=constrain.RowConstraints(finals) if any(finals) else None)
        except Exception as error:  # noqa: BLE001 - one bad sample must not sink the chunk: retry one by one
            if len(requests) == 1:
                return [Reply(error=f"{type(error).__name__}: {error}")]
            return [reply for request in requests for reply in self([request])]
        return [self._reply(tokens) for tokens in outputs]

    def _with_tools(self, requests: Sequence[Request], records: list[dict]) -> list[Reply]:
        from gptoss_jax import agent

        try:
            with contextlib.ExitStack() as stack:
                toolsets = [stack.enter_context(self._tools(r.tools)()) for r in requests]
                conversations = agent.run(self.generator, records, toolsets, max_turns=self.max_turns,
                                          max_tokens=self.generator.model.config.max_position_embeddings,
                                          max_new_tokens=self.max_tokens, temperature=self.temperature,
                                          top_p=self.top_p, seed=[r.seed for r in requests], slots=self.slots)
        except Exception as error:  # noqa: BLE001 - as the plain path: one bad sample must not sink the chunk
            if len(requests) == 1:
                return [Reply(error=f"{type(error).__name__}: {error}")]
            return [reply for request in requests for reply in self([request])]
        replies = []
        for record, done in zip(records, conversations, strict=True):
            calls = []  # each built-in call with the answer that followed it (None: unanswered)
            for message in done.messages:
                if message.role == "assistant" and agent.tool_name(message.recipient):
                    calls.append({"recipient": message.recipient, "input": message.text, "output": None})
                elif message.role == "tool" and calls:
                    calls[-1]["output"] = message.text
            replies.append(Reply(
                analysis=done.analysis, final=done.final,
                output=tok.get_encoding().decode(done.tokens[len(harmony.encode_chat(record)):]),
                completion_tokens=sum(step.tokens for step in done.steps if step.kind == "model"),
                truncated=done.finish != "final" and not done.finish.startswith("error"),
                tool_calls=tuple(calls)))
        return replies

    def _tools(self, names: tuple[str, ...]):
        from gptoss_jax import agent

        if names not in self._tool_makers:
            self._tool_makers[names] = agent.builtin_tools(names, browser_docs=self.browser_docs,
                                                           unsafe_python=self.unsafe_python_tool)
        return self._tool_makers[names]

    def _reply(self, tokens: list[int]) -> Reply:
        parsed = harmony.parse(tokens, role="assistant")
        messages = parsed.messages + ([parsed.partial] if parsed.partial else [])
        return Reply(analysis="".join(m.text for m in messages if m.channel == "analysis"),
                     final="".join(m.text for m in messages if m.channel == "final"),
                     output=tok.get_encoding().decode(tokens), completion_tokens=len(tokens),
                     truncated=not tokens or tokens[-1] not in (tok.RETURN, tok.CALL))


class OpenAIBackend:
    """An OpenAI-compatible chat completions endpoint; a chunk's requests are sent concurrently."""

    def __init__(self, base_url: str, *, model: str, api_key_env: str, timeout: float, max_tokens: int,
                 temperature: float, top_p: float):
        try:
            import openai
        except ImportError:
            raise BackendError("the openai backend needs the openai package: pip install 'gptoss-jax[eval]'") from None
        self.client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "unused",
                                    timeout=timeout, max_retries=2)
        try:
            served = [m.id for m in self.client.models.list()]
        except openai.APIError as error:
            raise BackendError(f"cannot reach the endpoint {base_url}: {error}") from None
        if model and served and model not in served:
            raise BackendError(f"{base_url} serves {served}, not {model!r}")
        if not (model or served):
            raise BackendError(f"{base_url} lists no models; set --config.endpoint.model")
        self.model = model or served[0]
        self.max_tokens, self.temperature, self.top_p = max_tokens, temperature, top_p
        self.describe = f"{base_url} ({self.model})"

    def __call__(self, requests: Sequence[Request], finished: Callable[[], None] | None = None) -> list[Reply]:
        """The replies, in order; `finished()` is called as each one arrives."""
        def ask(request: Request) -> Reply:
            reply = self._ask(request)
            if finished:
                finished()
            return reply

        with concurrent.futures.ThreadPoolExecutor(max_workers=len(requests)) as pool:
            return list(pool.map(ask, requests))

    def _ask(self, request: Request) -> Reply:
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": request.prompt}],
                reasoning_effort=request.effort, max_tokens=self.max_tokens, temperature=self.temperature,
                top_p=self.top_p, seed=request.seed,
                **({"response_format": request.response_format} if request.response_format else {}))
            choice = response.choices[0]
            message = choice.message
            # vLLM and gptoss-jax call the analysis reasoning_content; some servers call it reasoning
            extra = message.model_extra or {}
            analysis = extra.get("reasoning_content") or extra.get("reasoning") or ""
            final = message.content or ""
            truncated = choice.finish_reason == "length"
            stop = "" if truncated else "<|call|>" if choice.finish_reason == "tool_calls" else "<|return|>"
            tokens = response.usage.completion_tokens if response.usage else 0
        except Exception as error:  # noqa: BLE001 - recorded with the sample; the sweep goes on
            return Reply(error=f"{type(error).__name__}: {error}")
        return Reply(analysis=analysis, final=final, output=_reply_text(analysis, final, stop),
                     completion_tokens=tokens, truncated=truncated)
