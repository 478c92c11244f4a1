"""Generation from the command line: one prompt (`gptoss-jax generate`) or an interactive conversation
(`gptoss-jax chat`), on one device, a mesh, or several hosts under `jax.distributed` (`gptoss_jax.inference`
starts the model)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

from gptoss_jax import agent, harmony
from gptoss_jax import tokenizer as tok
from gptoss_jax.generation import Generator
from gptoss_jax.inference import add_model_arguments, start, tool_names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and the sampling (generate, chat)."""
    add_model_arguments(parser)
    parser.add_argument("--reasoning-effort", default="medium", choices=harmony.EFFORTS)
    parser.add_argument("--show-analysis", action="store_true", help="print the chain of thought too")
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 for greedy (gpt-oss is sampled at 1)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)


@dataclasses.dataclass
class Turn:
    analysis: str
    final: str
    tokens: int
    seconds: float
    error: str | None  # what did not parse in the model's output, if anything
    first_token: float | None = None  # seconds to the first token (prefill, and any compile)


def respond(generator: Generator, record: dict, args: argparse.Namespace,
            on_text: Callable[[str | None, str], None] = lambda channel, text: None) -> Turn:
    """Generates the assistant's turn for a conversation record, streaming text by channel to `on_text`."""
    prompt = harmony.encode_chat(record)
    parser = harmony.StreamParser(role="assistant")

    def stream(_row: int, token: int) -> None:
        parser.feed(token)
        if parser.delta:
            on_text(parser.current.channel if parser.current else None, parser.delta)

    started, first = time.perf_counter(), []
    tokens = generator.generate([prompt], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stream=_timed(stream, started, first))[0]
    seconds = time.perf_counter() - started
    result = parser.result()
    messages = result.messages + ([result.partial] if result.partial else [])
    text = {channel: "".join(m.text for m in messages if m.channel == channel) for channel in ("analysis", "final")}
    return Turn(text["analysis"], text["final"], len(tokens), seconds, result.error, first[0] if first else None)


def _printer(show_analysis: bool) -> Callable[[str | None, str], None]:
    state = {"channel": None}

    def on_text(channel: str | None, text: str) -> None:
        if jax.process_index() != 0 or (channel == "analysis" and not show_analysis) or channel not in (
                "analysis", "final"):
            return
        if channel != state["channel"]:
            print(f"\n[{channel}] " if show_analysis else "", end="")
            state["channel"] = channel
        print(text, end="", flush=True)

    return on_text


def run_generate(args: argparse.Namespace) -> int:
    generator = Generator(start(args))
    record = {"messages": [{"role": "user", "content": args.prompt}], "reasoning_effort": args.reasoning_effort}
    turn = respond(generator, record, args, _printer(args.show_analysis))
    if jax.process_index() == 0:
        print()
        _report(turn)
    return 0


COMMANDS = {"/help": "this list", "/reset": "forget the conversation, start a new one",
            "/effort low|medium|high": "the reasoning effort of the next turns", "/exit": "leave (or Ctrl-D)"}


def run_chat(args: argparse.Namespace) -> int:
    """Reads user turns until EOF or /exit; earlier turns' analysis is dropped as harmony requires. With --tools,
    each turn runs the agent loop, which prints the model's calls and the tools' answers as they happen. A line
    starting with / is a command for the CLI (`COMMANDS`), never sent to the model."""
    names = tool_names(args)
    if names and (args.coordinator or args.distributed):
        raise ValueError("--tools: chat runs built-in tools in a single process (the tools' answers would have to "
                         "reach every process)")
    tools = agent.builtin_tools(names, browser_docs=args.browser_docs, unsafe_python=args.unsafe_python_tool)(
        ) if names else agent.Toolset()  # a missing sandbox fails here, before the model loads
    generator = Generator(start(args))
    messages, effort = [], args.reasoning_effort
    say = print if jax.process_index() == 0 else (lambda *_, **__: None)
    say(f"gptoss-jax chat: {args.checkpoint}, reasoning effort {effort}"
        f"{', tools: ' + ', '.join(names) if names else ''}. /help for commands, /exit or Ctrl-D to leave.")
    with tools:
        while True:
            line = _read_line("you> ")
            if line is None or line.strip() == "/exit":
                return 0
            if not line.strip():
                continue
            if line.startswith("/"):
                command, _, value = line.strip().partition(" ")
                if command == "/reset":
                    messages = []
                    say("[a new conversation]")
                elif command == "/effort" and value.strip() in harmony.EFFORTS:
                    effort = value.strip()
                    say(f"[reasoning effort {effort}]")
                elif command == "/help":
                    say("\n".join(f"  {name:<26}{what}" for name, what in COMMANDS.items()))
                else:
                    say(f"[not a command: {line.strip()!r}; /help lists them]")
                continue
            messages.append({"role": "user", "content": line})
            record = {"messages": messages, "reasoning_effort": effort, "builtin_tools": names}
            if jax.process_index() == 0:
                print("assistant> ", end="", flush=True)
            if tools:
                turn, added = _agent_turn(generator, record, tools, args)
            else:
                turn = respond(generator, record, args, _printer(args.show_analysis))
                added = [{"role": "assistant", "thinking": turn.analysis, "content": turn.final}]
            messages += added
            if jax.process_index() == 0:
                print()
                _report(turn)


def _agent_turn(generator: Generator, record: dict, tools: agent.Toolset,
                args: argparse.Namespace) -> tuple[Turn, list[dict]]:
    """One assistant turn through the agent loop, printed as it happens: (the turn, the messages it added)."""
    printer, parsers = _printer(args.show_analysis), [harmony.StreamParser(role="assistant")]

    def on_token(_conversation: int, token: int) -> None:
        parser = parsers[-1].feed(token)
        if parser.delta and parser.current.recipient is None:
            printer(parser.current.channel, parser.delta)
        if token in (tok.CALL, tok.RETURN):  # the next generation starts after `<|start|>assistant`
            parsers.append(harmony.StreamParser(role="assistant"))

    def on_step(_conversation: int, step: agent.Step) -> None:
        for message in step.messages:
            if step.kind == "tool":
                print(f"\n[{message.name} answered]\n{message.text}", flush=True)
            elif message.recipient is not None:
                print(f"\n[call {message.recipient}]\n{message.text}", flush=True)

    started, first = time.perf_counter(), []
    on_token = _timed(on_token, started, first)
    (done,) = agent.run(generator, [record], [tools], max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                        max_tokens=generator.model.config.max_position_embeddings, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed + len(record["messages"]), on_token=on_token,
                        on_step=on_step)
    if done.finish != "final" and not done.finish.startswith("error"):
        print(f"\n[the turn ended without an answer: {done.finish}]", file=sys.stderr)
    generated = sum(step.tokens for step in done.steps if step.kind == "model")
    error = done.finish.removeprefix("error: ") if done.finish.startswith("error") else None
    seconds = time.perf_counter() - started
    return Turn(done.analysis, done.final, generated, seconds, error, first[0] if first else None), done.as_records()


def _timed(on_token: Callable, started: float, first: list) -> Callable:
    """`on_token`, noting in `first` the seconds from `started` to the first token."""
    def timed(*args) -> None:
        first or first.append(time.perf_counter() - started)
        on_token(*args)
    return timed


def _read_line(prompt: str) -> str | None:
    """A line from process 0's stdin, shared with every process (None at end of input)."""
    line = None
    if jax.process_index() == 0:
        try:
            line = input(prompt)
        except EOFError:
            line = None
    if jax.process_count() == 1:
        return line
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(b"\x00" if line is None else b"\x01" + line.encode(), np.uint8)
    length = int(multihost_utils.broadcast_one_to_all(np.int32(len(encoded))))
    padded = np.zeros(length, np.uint8)
    padded[: len(encoded)] = encoded[:length]
    data = bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded)))
    return None if data[0] == 0 else data[1:].decode()


def _report(turn: Turn) -> None:
    """Tokens and time; the rate counts the tokens after the first, over the time after it: the first waits for
    the prefill and, in a fresh process, for the compiles, which are not the decoding speed."""
    problem = f"; output did not parse: {turn.error}" if turn.error else ""
    decoding = turn.seconds - (turn.first_token or 0.0)
    rate = f", {(turn.tokens - 1) / decoding:.1f} tokens/s after it" if turn.tokens > 1 and decoding > 0 else ""
    first = f" (first after {turn.first_token:.1f}s{rate})" if turn.first_token is not None else ""
    print(f"[{turn.tokens} tokens in {turn.seconds:.1f}s{first}{problem}]", file=sys.stderr)
