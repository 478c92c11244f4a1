"""Starting a model for inference from the command line (`generate`, `chat`, `serve`; the eval harness loads its
model the same way): which checkpoint, on which devices and hosts (`jax.distributed`), with which adapter and
built-in tools. Below every command that runs a model; the commands themselves are `chat` and `server`.
"""

from __future__ import annotations

import argparse

import jax

from gptoss_jax.checkpoint import load_model
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
