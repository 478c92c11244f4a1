"""Generation from the command line: one prompt (`gptoss-jax generate`) or an interactive conversation
(`gptoss-jax chat`), on one device, a mesh, or several hosts under `jax.distributed`."""

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
from gptoss_jax.checkpoint import load_model
from gptoss_jax.generation import Generator
from gptoss_jax.lora import load_peft_adapter
from gptoss_jax.model import GptOss
from gptoss_jax.sharding import make_mesh, shard_model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which model, on which devices and hosts (generate, chat, serve)."""
    parser.add_argument("--checkpoint", required=True, metavar="PATH_OR_HUB_ID")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--mesh", default="", help="device mesh, e.g. expert=4,tensor=2 (default: one device)")
    parser.add_argument("--kernels", default="auto", choices=["xla", "pallas", "auto"],
                        help="attention and MXFP4 experts through XLA or the Pallas kernels (auto, the default: "
                        "the kernels on a GPU)")
    add_distributed_arguments(parser)


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """How this process joins a multi-host run (generate, chat, serve, train)."""
    parser.add_argument("--distributed", action="store_true",
                        help="join a multi-host run: jax.distributed.initialize() detects SLURM and other clusters")
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="explicit coordinator (with the two below)")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)


def join(args: argparse.Namespace) -> None:
    """Joins the distributed run the arguments name, if any."""
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    elif args.distributed:
        jax.distributed.initialize()


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


def add_tool_arguments(parser: argparse.ArgumentParser) -> None:
    """The built-in tools (chat, serve)."""
    parser.add_argument("--tools", default="", metavar="python,browser",
                        help="built-in tools the model may call: python (a sandboxed Jupyter kernel), browser "
                        "(search / open / find over --browser-docs)")
    parser.add_argument("--browser-docs", metavar="DIR", help="the folder of documents the browser tool searches")
    parser.add_argument("--unsafe-python-tool", action="store_true",
                        help="run the python tool without its bubblewrap sandbox (README: the python tool's sandbox)")
    parser.add_argument("--max-turns", type=int, default=16,
                        help="with --tools: generations per user turn (each tool call takes one)")


def tool_names(args: argparse.Namespace) -> list[str]:
    return [name.strip() for name in args.tools.split(",") if name.strip()]


def start(args: argparse.Namespace) -> GptOss:
    """Joins the distributed run if asked and loads the model on the mesh."""
    join(args)
    return load_for_inference(args.checkpoint, dtype=args.dtype, mesh=args.mesh, lora=getattr(args, "lora", None),
                              kernels=args.kernels)


def load_for_inference(checkpoint: str, *, dtype: str, mesh: str = "", lora: str | None = None,
                       kernels: str = "auto") -> GptOss:
    """The model on its devices — the mesh described (e.g. "expert=4,tensor=2"), else one device, or with several
    hosts every device sharing the parameters (FSDP) — with a PEFT LoRA adapter on it if given."""
    if mesh:
        mesh = make_mesh(mesh)
    else:
        mesh = make_mesh({"fsdp": -1}) if jax.process_count() > 1 else None
    model = load_model(checkpoint, dtype=dtype, mesh=mesh, kernels=kernels)
    if lora:
        load_peft_adapter(model, lora)
        if model.mesh is not None:
            shard_model(model, model.mesh)
    return model


@dataclasses.dataclass
class Turn:
    analysis: str
    final: str
    tokens: int
    seconds: float
    error: str | None  # what did not parse in the model's output, if anything


def respond(generator: Generator, record: dict, args: argparse.Namespace,
            on_text: Callable[[str | None, str], None] = lambda channel, text: None) -> Turn:
    """Generates the assistant's turn for a conversation record, streaming text by channel to `on_text`."""
    prompt = harmony.encode_chat(record)
    parser = harmony.StreamParser(role="assistant")

    def stream(_row: int, token: int) -> None:
        parser.feed(token)
        if parser.delta:
            on_text(parser.current.channel if parser.current else None, parser.delta)

    started = time.perf_counter()
    tokens = generator.generate([prompt], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stream=stream)[0]
    seconds = time.perf_counter() - started
    result = parser.result()
    messages = result.messages + ([result.partial] if result.partial else [])
    text = {channel: "".join(m.text for m in messages if m.channel == channel) for channel in ("analysis", "final")}
    return Turn(text["analysis"], text["final"], len(tokens), seconds, result.error)


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


def run_chat(args: argparse.Namespace) -> int:
    """Reads user turns until EOF or /exit; earlier turns' analysis is dropped as harmony requires. With --tools,
    each turn runs the agent loop, which prints the model's calls and the tools' answers as they happen."""
    names = tool_names(args)
    if names and (args.coordinator or args.distributed):
        raise ValueError("--tools: chat runs built-in tools in a single process (the tools' answers would have to "
                         "reach every process)")
    tools = agent.builtin_tools(names, browser_docs=args.browser_docs, unsafe_python=args.unsafe_python_tool)(
        ) if names else agent.Toolset()  # a missing sandbox fails here, before the model loads
    generator = Generator(start(args))
    messages = []
    with tools:
        while True:
            line = _read_line("you> ")
            if line is None or line.strip() == "/exit":
                return 0
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            record = {"messages": messages, "reasoning_effort": args.reasoning_effort, "builtin_tools": names}
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

    started = time.perf_counter()
    (done,) = agent.run(generator, [record], [tools], max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                        max_tokens=generator.model.config.max_position_embeddings, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed + len(record["messages"]), on_token=on_token,
                        on_step=on_step)
    if done.finish != "final" and not done.finish.startswith("error"):
        print(f"\n[the turn ended without an answer: {done.finish}]", file=sys.stderr)
    generated = sum(step.tokens for step in done.steps if step.kind == "model")
    error = done.finish.removeprefix("error: ") if done.finish.startswith("error") else None
    return Turn(done.analysis, done.final, generated, time.perf_counter() - started, error), done.as_records()


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
    rate = turn.tokens / turn.seconds if turn.seconds else 0.0
    problem = f"; output did not parse: {turn.error}" if turn.error else ""
    print(f"[{turn.tokens} tokens in {turn.seconds:.1f}s, {rate:.1f} tokens/s{problem}]", file=sys.stderr)
