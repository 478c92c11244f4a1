"""The agent loop: gpt-oss generates until it ends its turn or calls a tool; its built-in tools (`python`,
`browser.search` / `open` / `find`) run here and their answers go back into the conversation, generation goes on;
a function call (`functions.*`) ends the loop and goes to the caller, who answers it and runs the loop again.

`ToolLoop` is the one tool loop: one conversation's turns on the engine (`gptoss_jax.engine`), each conversation
in a slot it keeps across turns, so one that goes on after a tool's answer prefills only the tokens it appended (its
last output token, the answer, the next header), never the whole conversation again. `run` drives many
conversations at once on one engine, the server (`gptoss_jax.protocol.Choice`) one a choice; either way a
conversation waiting for a tool (python may take seconds; it runs in a worker thread) leaves the others decoding,
and what a conversation generates does not depend on the others.

A conversation is kept as tokens — the prompt, the model's tokens exactly as sampled, each tool answer rendered as a
harmony message — so what the model reads back is what it wrote, and as messages, for the caller. Every generation
and every tool call is recorded as a `Step`. Limits: `max_turns` generations per conversation (a call made in the
last one is left unanswered), `max_new_tokens` a generation and `max_tokens` in its context (prompt, output and
tool answers together).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from gptoss_jax import harmony
from gptoss_jax import tokenizer as tok
from gptoss_jax.engine import Engine, Request
from gptoss_jax.generation import DEFAULT_STOP_TOKENS

log = logging.getLogger(__name__)


@functools.cache
def assistant_prompt() -> list[int]:
    """`<|start|>assistant`: what follows a tool's answer for the model to go on. Made on first use, so that
    importing this module (as `gptoss-jax --help` does) needs no tokenizer."""
    return [tok.START, *tok.get_encoding().encode_ordinary("assistant")]


class Toolset(dict):
    """One conversation's built-in tools by name — "python": a `PythonTool`, "browser": a `BrowserTool` — kept
    across calls of `run` (a function call's answer comes back in a later call; the kernel's state must stay).
    Closing it shuts the kernel down."""

    def __enter__(self) -> Toolset:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Closes every tool, even when one fails (logged)."""
        for name, tool in self.items():
            try:
                if hasattr(tool, "close"):
                    tool.close()
            except Exception:  # one tool's failure must not leave the others open
                log.exception("closing the %s tool failed", name)


@dataclasses.dataclass
class Step:
    kind: str  # "model" (a generation) or "tool" (a built-in call answered)
    messages: list[harmony.Message]  # what the model wrote, or the tool's answer
    tokens: int  # tokens generated, or the answer's tokens appended
    seconds: float


@dataclasses.dataclass
class Conversation:
    """One conversation's state and, once it ends, its outcome."""

    record: Mapping[str, Any]
    tokens: list[int]  # everything the model reads: prompt, its output, the tools' answers
    tools: Mapping[str, Any] | None  # its built-in tools; None: the caller answers every call
    messages: list[harmony.Message] = dataclasses.field(default_factory=list)  # added by the loop
    steps: list[Step] = dataclasses.field(default_factory=list)
    # "final", "function_call", "max_turns", "max_tokens" (its context is full), "length" (a generation cut by
    # its token limit), "cancelled" or "error: ..."
    finish: str | None = None

    @property
    def final(self) -> str:
        return "".join(m.text for m in self.messages if m.role == "assistant" and m.channel == "final")

    @property
    def analysis(self) -> str:
        return "".join(m.text for m in self.messages if m.role == "assistant" and m.channel == "analysis"
                       and m.recipient is None)

    @property
    def function_calls(self) -> list[harmony.Message]:
        """The calls handed back to the caller (the last generation's `functions.*` messages)."""
        if self.finish != "function_call":
            return []
        return [m for m in self.steps[-1].messages if (m.recipient or "").startswith("functions.")]

    @property
    def tool_calls(self) -> list[harmony.Message]:
        """Every built-in call the model made, in order."""
        return [m for m in self.messages if m.role == "assistant" and tool_name(m.recipient) is not None]

    def as_records(self) -> list[dict[str, Any]]:
        """The added messages as harmony-native record messages (to append to the record and run on)."""
        return [as_record(m) for m in self.messages]


def as_record(message: harmony.Message) -> dict[str, Any]:
    """A harmony message as a harmony-native record message (`harmony.to_messages` reads it back unchanged)."""
    return {"role": message.role, "content": message.text, "channel": message.channel,
            "recipient": message.recipient, "content_type": message.content_type, "name": message.name}


class ToolLoop:
    """One conversation on an engine (`gptoss_jax.engine`), turn by turn: the model generates; when it calls a
    built-in tool, the tool answers (in a worker thread: python may take seconds) and the model goes on. Used by
    `run` (many conversations at once) and by the server (each choice of a chat or Responses request).

    The conversation keeps its engine slot (its KV cache) across turns: the next turn appends what the slot lacks
    (the call's last token, sampled but never fed; the answer; the next `<|start|>assistant`) and prefills only
    that. Only when that slot has too little room left (its first prompt's left padding counts against it) does a
    turn start afresh in a new slot, its whole conversation prefilled, so that it gets the context's whole room as
    it would alone.

    `request(tokens, turn)`: the turn's sampling settings (and constraint) as an engine `Request`, given everything
    the model reads; the loop sets what it generates from, how many tokens, the stop tokens and the slot. A turn
    generates at most `max_new_tokens`, all turns together at most `budget` (None: no such bound), and a
    conversation holds at most `limit` tokens. `on_token(token, logprob, top)` sees every generated token as the
    engine reports it, `on_step(step)` every generation and tool answer (both on the event loop). Without tools
    (`conversation.tools` None), a built-in call ends the conversation as a function call does: the caller answers
    it."""

    def __init__(self, engine: Engine, conversation: Conversation, request: Callable[[list[int], int], Request], *,
                 max_turns: int, max_new_tokens: int, limit: int, budget: int | None = None,
                 on_token: Callable[[int, float, tuple], None] | None = None,
                 on_step: Callable[[Step], None] | None = None,
                 tool_threads: concurrent.futures.Executor | None = None):
        self.engine, self.conversation, self.request = engine, conversation, request
        self.max_turns, self.max_new_tokens, self.limit, self.budget = max_turns, max_new_tokens, limit, budget
        self.on_token, self.on_step = on_token or (lambda token, *_: None), on_step or (lambda step: None)
        self.tool_threads = tool_threads  # where tool calls run (None: the event loop's default threads)
        self.loop = asyncio.get_running_loop()
        self.inbox: asyncio.Queue = asyncio.Queue()  # this turn's engine events
        self.generated = 0  # tokens generated over all turns
        self.job: Request | None = None
        self.reason: str | None = None  # how the engine ended the last turn: "stop", "length", "cancelled", ...
        self.cancelled = False
        self.ended = False

    def start(self) -> None:
        """Submits the first turn now, so that a turn the engine refuses fails (ValueError) before anything runs."""
        self._submit(0, self._left(), None)

    def cancel(self) -> None:
        """Ends the conversation early (its client left, or a stop string was reached)."""
        if not self.ended:
            self.cancelled = True
            if self.job is not None:
                self.engine.cancel(self.job)

    async def run(self) -> Conversation:
        """The turns, after `start`, to the conversation's end (`finish` set)."""
        conversation, appended = self.conversation, None
        try:
            for turn in range(self.max_turns):
                if turn:
                    left = self._left()
                    if self.cancelled or left < 1:
                        spent = self.budget is not None and self.generated >= self.budget
                        conversation.finish = "cancelled" if self.cancelled else "length" if spent else "max_tokens"
                        self.reason = "cancelled" if self.cancelled else self.reason
                        break
                    if len(appended) + left > self.engine.room(self.job.slot):
                        self.engine.cancel(self.job)  # its slot is too short now: release it, start afresh
                        appended = None
                    self._submit(turn, left, appended)
                started = time.perf_counter()
                while (event := await self.inbox.get())[0] == "token":
                    self.generated += 1
                    self.on_token(*event[1:])
                self.reason = event[1]
                call = self._take_output(time.perf_counter() - started)
                if call is None:
                    break
                if turn + 1 == self.max_turns:  # no turn left to read an answer in: the call stays unanswered
                    break
                step = await self.loop.run_in_executor(self.tool_threads, answer, conversation.tools, call)
                conversation.steps.append(step)
                conversation.messages += step.messages
                self.on_step(step)
                added = harmony.render_message(step.messages[0])[0] + assistant_prompt()
                appended = self.job.tokens[-1:] + added
                conversation.tokens += added
        except Exception as error:  # a failed turn fails this conversation, never the others
            self.reason = conversation.finish = f"error: {error}"
        finally:
            if self.job is not None and self.job.keep:  # the slot it kept for its next turn
                self.engine.cancel(self.job)
            self.ended = True
            if conversation.finish is None:
                conversation.finish = "max_turns"
        return conversation

    def _left(self) -> int:
        """How many tokens the next turn may generate."""
        left = min(self.max_new_tokens, self.limit - len(self.conversation.tokens))
        return left if self.budget is None else min(left, self.budget - self.generated)

    def _submit(self, turn: int, left: int, appended: list[int] | None) -> None:
        """A turn: generating after the whole conversation; with `appended` (its end), in the slot the last turn
        kept, prefilling only that."""

        def put(kind):
            return lambda *value: self.loop.call_soon_threadsafe(self.inbox.put_nowait, (kind, *value))

        tokens = list(self.conversation.tokens)
        self.job = dataclasses.replace(
            self.request(tokens, turn), prompt=appended or tokens, max_tokens=left, stop_tokens=DEFAULT_STOP_TOKENS,
            on_token=put("token"), on_done=put("done"), keep=self.conversation.tools is not None,
            slot=self.job.slot if appended else None)
        self.engine.submit(self.job)

    def _take_output(self, seconds: float) -> harmony.Message | None:
        """Adds the turn's generation to the conversation; returns the built-in call to answer, if it made one."""
        conversation, output = self.conversation, self.job.tokens
        parsed = harmony.parse(output, role="assistant")
        messages = parsed.messages + ([parsed.partial] if parsed.partial else [])
        step = Step("model", messages, len(output), seconds)
        conversation.steps.append(step)
        conversation.messages += messages
        conversation.tokens += output
        self.on_step(step)
        last = output[-1] if output else None
        cut = last not in DEFAULT_STOP_TOKENS  # by a token limit
        if self.reason not in ("stop", "length"):  # "cancelled", or "error: ..." (the engine's)
            conversation.finish = self.reason
        elif parsed.error and not (cut and parsed.error == harmony.HEADER_CUT):
            conversation.finish = f"error: {parsed.error}"
        elif last == tok.RETURN:
            conversation.finish = "final"
        elif cut:
            conversation.finish = "max_tokens" if len(conversation.tokens) >= self.limit else "length"
        elif conversation.tools is None or not messages or (messages[-1].recipient or "").startswith("functions."):
            conversation.finish = "function_call"
        else:
            return messages[-1]
        return None


def run(generator, records: Sequence[Mapping[str, Any]], toolsets: Sequence[Mapping[str, Any]], *,
        max_turns: int = 16, max_tokens: int = 8192, max_new_tokens: int = 2048, temperature: float = 1.0,
        top_p: float = 1.0, seed: int | Sequence[int] = 0, slots: int | None = None,
        on_token: Callable[[int, int], None] | None = None,
        on_step: Callable[[int, Step], None] | None = None) -> list[Conversation]:
    """Runs each record's conversation until the assistant answers, calls a function, or a limit is reached, all at
    once on one engine (`slots` conversations decoding at a time, default all; a conversation waiting for a tool
    leaves the others decoding).

    generator: a `gptoss_jax.generation.Generator` (its model, parameters and compiled steps are used).
    toolsets[i]: conversation i's built-in tools by name (a `Toolset`); the model is shown the ones its record
    lists in `builtin_tools`, and a call to one it lacks is answered with an error it can read.
    seed: one for all (each conversation then draws its own from it and its index), or one per conversation.
    on_token(i, token) sees every generated token; on_step(i, step) every generation and tool answer.
    """
    if jax.process_count() > 1:
        raise ValueError("the agent loop runs in a single process (the tools' answers would have to reach every "
                         "process)")
    limit = min(max_tokens, generator.model.config.max_position_embeddings)
    seeds = [seed * 1_000_003 + 7_919 * i for i in range(len(records))] if isinstance(seed, int) else list(seed)
    if not len(toolsets) == len(seeds) == len(records):
        raise ValueError(f"{len(toolsets)} toolsets and {len(seeds)} seeds for {len(records)} conversations")
    conversations = [Conversation(record, harmony.encode_chat(record), tools)
                     for record, tools in zip(records, toolsets, strict=True)]
    going = []
    for i, conversation in enumerate(conversations):
        if len(conversation.tokens) >= limit:
            conversation.finish = "max_tokens"
        else:
            going.append(i)
    if not going:
        return conversations
    first = max(len(conversations[i].tokens) for i in going) + max_new_tokens  # the first turn's indices, at most
    engine = Engine(generator.model, slots=min(slots or len(going), len(going)), max_length=limit,
                    capacity=1 << (first - 1).bit_length(), split=(generator.graphdef, generator.state),
                    steps=generator.steps)

    def request(i):
        return lambda tokens, turn: Request(tokens, 0, temperature, top_p, seed=(seeds[i] + turn * 104_729) % (1 << 31))

    def tokens_to(i):
        return None if on_token is None else lambda token, *_: on_token(i, token)

    async def converse():
        with concurrent.futures.ThreadPoolExecutor(max(1, min(8, len(going)))) as tool_threads:
            loops = [ToolLoop(engine, conversations[i], request(i), max_turns=max_turns, limit=limit,
                              max_new_tokens=max_new_tokens, tool_threads=tool_threads, on_token=tokens_to(i),
                              on_step=on_step and functools.partial(on_step, i))
                     for i in going]
            for loop in loops:
                loop.start()
            await asyncio.gather(*(loop.run() for loop in loops))

    engine.start()
    try:  # in a thread of its own: the caller may be running an event loop (a notebook)
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            thread.submit(asyncio.run, converse()).result()
    finally:
        engine.stop()
    return conversations


def answer(tools: Mapping[str, Any], call: harmony.Message) -> Step:
    """The tool's answer to a built-in call, as the message the model reads (an unknown tool is told so)."""
    started = time.perf_counter()
    name = tool_name(call.recipient)
    tool = tools.get(name) if name else None
    if tool is None:
        available = ", ".join(sorted(tools)) or "none"
        text = f"Error: there is no tool {call.recipient!r} in this conversation (tools: {available})."
    else:
        try:
            text = tool.run(call.text) if name == "python" else tool.call(call.recipient, call.text)
        except Exception as error:  # a tool's failure is the model's to read, never the host's end
            text = f"Error: {type(error).__name__}: {error}"
    reply = harmony.Message("tool", text, call.channel, "assistant", name=call.recipient)
    return Step("tool", [reply], len(harmony.render_message(reply)[0]), time.perf_counter() - started)


def tool_name(recipient: str | None) -> str | None:
    """"python" for `python`, "browser" for `browser.search` etc.; None for function calls and plain text."""
    if not recipient or recipient.startswith("functions.") or recipient in ("all", "assistant", "user"):
        return None
    return recipient.split(".", 1)[0]


def builtin_tools(names: Sequence[str], *, browser_docs: str | None = None,
                  unsafe_python: bool = False) -> Callable[..., Toolset]:
    """A maker of the named built-in tools, a fresh `Toolset` per conversation: `python` (a sandboxed kernel) and
    `browser` (over the local folder `browser_docs`, indexed once). Bad names and settings fail here."""
    unknown = set(names) - set(harmony.BUILTIN_TOOLS)
    if unknown:
        raise ValueError(f"unknown built-in tool {sorted(unknown)[0]!r}; the built-in tools are "
                         f"{', '.join(harmony.BUILTIN_TOOLS)}")
    if "browser" in names and not browser_docs:
        raise ValueError("the browser tool needs a folder of documents to search (--browser-docs DIR)")
    from gptoss_jax.tools import BrowserTool, LocalBackend, PythonTool

    backend = LocalBackend(browser_docs) if "browser" in names else None
    if "python" in names:  # a machine that cannot sandbox the kernel fails here, before any conversation
        PythonTool(unsafe=unsafe_python).close()

    def make(only: Sequence[str] | None = None) -> Toolset:
        """The tools (all, or those in `only`) of one new conversation."""
        wanted = names if only is None else only
        made = Toolset()
        if "browser" in wanted:
            made["browser"] = BrowserTool(backend)
        if "python" in wanted:
            made["python"] = _OnFirstUse(lambda: PythonTool(unsafe=unsafe_python))
        return made

    return make


class _OnFirstUse:
    """A tool made when the model first calls it: a kernel takes a second to start, and most conversations
    that may call python never do."""

    def __init__(self, make: Callable[[], Any]):
        self._make, self._tool = make, None

    def __getattr__(self, name: str) -> Any:
        if self._tool is None:
            self._tool = self._make()
        return getattr(self._tool, name)

    def close(self) -> None:
        if self._tool is not None:
            self._tool.close()
