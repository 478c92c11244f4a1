"""The agent loop: gpt-oss generates until it ends its turn or calls a tool; its built-in tools (`python`,
`browser.search` / `open` / `find`) run here and their answers go back into the conversation, generation goes on;
a function call (`functions.*`) ends the loop and goes to the caller, who answers it and runs the loop again.

Many conversations run at once on one `Generator`: each round generates for every conversation still going (one
batch on the engine), then runs the round's tool calls (in threads: a python call may take seconds). A
conversation is kept as tokens — the prompt, the model's tokens exactly as sampled, each tool answer rendered as a
harmony message — so what the model reads back is what it wrote, and as messages, for the caller. Every
generation and every tool call is recorded as a `Step`. Limits: `max_turns` generations per conversation (a call
made in the last one is left unanswered) and `max_tokens` in its context (prompt, output and tool answers
together).

Each conversation keeps its engine slot (and its KV cache) across rounds: one that goes on after a tool's answer
prefills only the tokens it appended (its last output token, the answer, the next header; `Generator.resume`),
never the whole conversation again; one that ends frees its slot.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gptoss_jax import harmony
from gptoss_jax import tokenizer as tok

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
    tools: Mapping[str, Any]
    messages: list[harmony.Message] = dataclasses.field(default_factory=list)  # added by the loop
    steps: list[Step] = dataclasses.field(default_factory=list)
    finish: str | None = None  # "final", "function_call", "max_turns", "max_tokens", "length" or "error: ..."

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


def run(generator, records: Sequence[Mapping[str, Any]], toolsets: Sequence[Mapping[str, Any]], *,
        max_turns: int = 16, max_tokens: int = 8192, max_new_tokens: int = 2048, temperature: float = 1.0,
        top_p: float = 1.0, seed: int | Sequence[int] = 0, on_token: Callable[[int, int], None] | None = None,
        on_step: Callable[[int, Step], None] | None = None) -> list[Conversation]:
    """Runs each record's conversation until the assistant answers, calls a function, or a limit is reached.

    toolsets[i]: conversation i's built-in tools by name (a `Toolset`); the model is shown the ones its record
    lists in `builtin_tools`, and a call to one it lacks is answered with an error it can read.
    seed: one for all (each conversation then draws its own from it and its index), or one per conversation.
    on_token(i, token) sees every generated token; on_step(i, step) every generation and tool answer.
    """
    limit = min(max_tokens, generator.model.config.max_position_embeddings)
    seeds = [seed * 1_000_003 + 7_919 * i for i in range(len(records))] if isinstance(seed, int) else list(seed)
    if not len(toolsets) == len(seeds) == len(records):
        raise ValueError(f"{len(toolsets)} toolsets and {len(seeds)} seeds for {len(records)} conversations")
    conversations = [Conversation(record, harmony.encode_chat(record), tools)
                     for record, tools in zip(records, toolsets, strict=True)]
    for conversation in conversations:
        if len(conversation.tokens) >= limit:
            conversation.finish = "max_tokens"
    kept, cached = None, []  # the kept rows and the conversation of each
    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, len(records)))) as pool:
        for turn in range(max_turns):
            going = [i for i, c in enumerate(conversations) if c.finish is None]
            if not going:
                break
            parsers = {i: harmony.StreamParser(role="assistant") for i in going}

            def stream(row: int, token: int, going=going, parsers=parsers) -> None:
                parsers[going[row]].feed(token)
                if on_token is not None:
                    on_token(going[row], token)

            # one batch; each row as many new tokens as its own room in `limit` positions leaves
            new = [min(max_new_tokens, limit - len(conversations[i].tokens)) for i in going]
            settings = {"temperature": temperature, "top_p": top_p, "stream": stream,
                        "seed": [(seeds[i] + turn * 104_729) % (1 << 31) for i in going]}
            started = time.perf_counter()
            if kept is None:
                outputs, kept = generator.generate([conversations[i].tokens for i in going], new, keep_cache=True,
                                                   **settings)
            else:  # the conversations that go on keep their rows: only what they lack is prefilled
                if cached != going:
                    kept = generator.take_rows(kept, [cached.index(i) for i in going])
                appended = [conversations[i].tokens[fed:] for i, fed in zip(going, generator.fed(kept), strict=True)]
                outputs, kept = generator.resume(kept, appended, new, **settings)
            cached = going
            seconds = (time.perf_counter() - started) / len(going)
            calls = {}
            for i, output in zip(going, outputs, strict=True):
                calls[i] = _take_output(conversations[i], output, parsers[i].result(), seconds, limit)
                if on_step is not None:
                    on_step(i, conversations[i].steps[-1])
            if turn + 1 == max_turns:  # no generation left to read an answer: the calls stay unanswered
                break
            pending = {i: pool.submit(answer, conversations[i].tools, call) for i, call in calls.items() if call}
            for i, future in pending.items():
                conversation, step = conversations[i], future.result()
                conversation.steps.append(step)
                conversation.messages += step.messages
                conversation.tokens += harmony.render_message(step.messages[0])[0] + assistant_prompt()
                if on_step is not None:
                    on_step(i, step)
                if len(conversation.tokens) >= limit:
                    conversation.finish = "max_tokens"
    for conversation in conversations:
        if conversation.finish is None:
            conversation.finish = "max_turns"
    return conversations


def _take_output(conversation: Conversation, output: list[int], parsed: harmony.ParseResult, seconds: float,
                 limit: int) -> harmony.Message | None:
    """Adds one generation to the conversation; returns the built-in call to answer, if it made one."""
    messages = parsed.messages + ([parsed.partial] if parsed.partial else [])
    step = Step("model", messages, len(output), seconds)
    conversation.steps.append(step)
    conversation.messages += messages
    conversation.tokens += output
    last = output[-1] if output else None
    cut = last not in (tok.RETURN, tok.CALL)  # by a token limit
    if parsed.error and not (cut and parsed.error == harmony.HEADER_CUT):
        conversation.finish = f"error: {parsed.error}"
    elif last == tok.RETURN:
        conversation.finish = "final"
    elif cut:
        conversation.finish = "max_tokens" if len(conversation.tokens) >= limit else "length"
    elif (messages[-1].recipient or "").startswith("functions."):
        conversation.finish = "function_call"
    else:
        return messages[-1]
    return None


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
