"""The `gptoss-jax` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

PRESETS = {"tiny": "tiny", "gpt-oss-20b": "gpt_oss_20b", "gpt-oss-120b": "gpt_oss_120b"}


def main(argv: list[str] | None = None) -> int:
    from gptoss_jax import gpu_compile
    from gptoss_jax.allocator import reuse_freed_memory

    reuse_freed_memory()  # before jax starts its threads (gptoss_jax/allocator.py says why)
    gpu_compile.use_cpu_platform()  # the CUDA plugin without a GPU: the CPU, and compiling for GPUs deviceless
    parser = argparse.ArgumentParser(prog="gptoss-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect",
        help="describe a model; load a checkpoint and predict the next tokens of a prompt",
        description="Prints the architecture and parameter counts (from shapes alone). With --checkpoint, or for "
        "the tiny preset (random weights), also runs the model on --prompt and prints the likeliest next tokens.",
    )
    source = inspect.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    source.add_argument("--checkpoint", metavar="PATH_OR_HUB_ID", help="a checkpoint directory or hub repo id")
    inspect.add_argument("--prompt", default="The capital of France is")
    inspect.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])

    convert = commands.add_parser(
        "convert",
        help="rewrite a checkpoint in the HF layout (from original/, or between unquantized and MXFP4 experts)",
        description="Reads SRC (HF, HF-MXFP4 or original layout; a directory or hub repo id) and writes DST in "
        "the HF layout that transformers loads, one tensor at a time.",
    )
    convert.add_argument("source", metavar="SRC")
    convert.add_argument("destination", metavar="DST")
    convert.add_argument("--mxfp4", action=argparse.BooleanOptionalAction, default=True,
                         help="store the experts in MXFP4, as released (default), or dense")
    convert.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                         help="dtype of experts written dense from MXFP4 (other tensors keep theirs)")
    convert.add_argument("--max-shard-size", default="5GB", help="largest shard file, e.g. 5GB or 500MB")
    convert.add_argument("--revision", help="hub revision of SRC")

    from gptoss_jax import chat, inference

    generate = commands.add_parser("generate", help="answer one prompt (harmony format), printing tokens/s",
                                   description="Renders the prompt as a harmony conversation at the given reasoning "
                                   "effort, generates, and prints the final answer (and the analysis if asked).")
    generate.add_argument("--prompt", required=True)
    chat.add_arguments(generate)
    conversation = commands.add_parser("chat", help="interactive multi-turn harmony chat (/exit or EOF to leave)")
    chat.add_arguments(conversation)
    inference.add_tool_arguments(conversation)
    serve = commands.add_parser("serve", help="OpenAI-compatible chat completions server (continuous batching)",
                                description="POST /v1/chat/completions, GET /v1/models, GET /health. Needs the "
                                "serve extra: pip install 'gptoss-jax[serve]'.")
    inference.add_model_arguments(serve)
    serve.add_argument("--lora", metavar="ADAPTER_DIR", help="a PEFT LoRA adapter to put on the model")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--slots", type=int, default=16, help="requests decoded together")
    serve.add_argument("--max-context", type=int, help="tokens per request, prompt included (default: 8192, or the "
                       "model's max_position_embeddings if smaller)")
    serve.add_argument("--served-model-name", nargs="+", metavar="NAME",
                       help="the model ids clients may ask for, the first reported in responses (default: the "
                       "checkpoint's name); a request naming another model is a 404")
    serve.add_argument("--api-key", default=os.environ.get("GPTOSS_API_KEY"),
                       help="require `Authorization: Bearer KEY` on /v1/ (default: $GPTOSS_API_KEY; none: open)")
    serve.add_argument("--max-request-bytes", type=int, default=16 * 2**20,
                       help="largest request body; a larger one is refused with 413 (default: 16 MiB)")
    inference.add_tool_arguments(serve)

    for name, help_text in (("train", "fine-tune (LoRA or full) from a config file"),
                            ("plan", "compile the train step on abstract inputs and report per-device memory"),
                            ("eval", "sweep tasks x reasoning efforts, grading every sample; writes a report")):
        folder, example = ("eval", "limit=20") if name == "eval" else ("train", "train.steps=100")
        command = commands.add_parser(name, help=help_text, description=f"{help_text}. Override any setting "
                                      f"with --config.KEY=VALUE (e.g. --config.{example}).")
        command.add_argument("--config", required=True, metavar="FILE", help=f"a configs/{folder}/*.py file")
        if name == "plan":
            command.add_argument("--target", metavar="h100|h200|FILE",
                                 help="compile for this GPU (present or not: needs the gpu-compile extra without "
                                 "one) and report XLA GPU's own figures; FILE: a gpu_device_info target config")
            command.add_argument("--device-memory", help="memory of one device, e.g. 80GiB (default: the target's, "
                                 "or 80GiB)")
        if name == "train":
            inference.add_distributed_arguments(command)

    args, extra = parser.parse_known_args(argv)
    configured = args.command in ("train", "plan", "eval")
    overrides = _overrides(extra) if configured else extra
    if not configured and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("gptoss_jax").setLevel(logging.INFO)
    try:
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "convert":
            return _convert(args)
        if args.command in ("generate", "chat"):
            return chat.run_generate(args) if args.command == "generate" else chat.run_chat(args)
        if args.command == "serve":
            from gptoss_jax import server

            return server.run(args)
        if args.command == "eval":
            return _eval(args, overrides)
        return _train(args, overrides) if args.command == "train" else _plan(args, overrides)
    except (ValueError, OSError) as error:  # ConfigError and CheckpointError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 2


def _overrides(extra: list[str]) -> list[str]:
    """--config.a.b=v and --config.a.b v, as a.b=v."""
    overrides, pending = [], None
    for arg in extra:
        if pending is not None:
            overrides.append(f"{pending}={arg}")
            pending = None
        elif arg.startswith("--config.") and "=" in arg:
            overrides.append(arg)
        elif arg.startswith("--config."):
            pending = arg
        else:
            raise ValueError(f"unrecognized argument {arg!r}: settings are given as --config.KEY=VALUE")
    if pending is not None:
        raise ValueError(f"{pending}: missing a value")
    return overrides


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from gptoss_jax import inference
    from gptoss_jax.train import grpo, trainer
    from gptoss_jax.train.config import load_config
    from gptoss_jax.train.rewards import RewardError
    from gptoss_jax.train.run import TrainingStopped

    config = load_config(args.config, overrides)
    inference.join(args)
    try:  # the method chooses the loop: supervised fine-tuning or GRPO, both built on train.run
        result = (grpo.train if config.method == "grpo" else trainer.train)(config)
    except (TrainingStopped, RewardError) as stopped:
        print(f"error: {stopped}", file=sys.stderr)
        return 1
    print(result.summary())
    for kind, path in result.exports.items():
        print(f"{kind}: {path}")
    return 0


def _plan(args: argparse.Namespace, overrides: list[str]) -> int:
    from gptoss_jax.train.config import load_config
    from gptoss_jax.train.plan import plan

    memory = _bytes(args.device_memory) if args.device_memory else None
    print(plan(load_config(args.config, overrides), device_memory=memory, target=args.target).report())
    return 0


def _eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from gptoss_jax.eval import report, sweep
    from gptoss_jax.eval.backends import BackendError

    try:
        result = sweep.run(sweep.load_config(args.config, overrides))
    except BackendError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.markdown(result.summary))
    print(f"{result.generated} samples generated now; report: {result.report}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from gptoss_jax.checkpoint import convert

    convert(args.source, args.destination, mxfp4=args.mxfp4, dtype=args.dtype, revision=args.revision,
            max_shard_size=_bytes(args.max_shard_size), progress=True)
    return 0


def _bytes(size: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    for unit, factor in units.items():
        if size.upper().endswith(unit) and size[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(size[: -len(unit)]) * factor)
    raise ValueError(f"--max-shard-size {size!r}: expected a size like 5GB, 500MB or 2GiB")


def _inspect(args: argparse.Namespace) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from gptoss_jax import GptOss, GptOssConfig, load_model, parameter_counts
    from gptoss_jax.checkpoint import open_checkpoint
    from gptoss_jax.tokenizer import get_encoding

    if args.checkpoint:
        config = open_checkpoint(args.checkpoint).config
    else:
        config = getattr(GptOssConfig, PRESETS[args.preset])()
    total, active = parameter_counts(config)
    print(f"{args.checkpoint or args.preset}: {config}")
    print(f"parameters: {total / 1e9:.2f}B total, {active / 1e9:.2f}B active per token")
    if not args.checkpoint and args.preset != "tiny":
        return 0

    start = time.perf_counter()
    if args.checkpoint:
        model = load_model(args.checkpoint, dtype=args.dtype)
    else:
        model = GptOss(config, dtype=args.dtype, rngs=nnx.Rngs(0))
    print(f"model ready in {time.perf_counter() - start:.1f}s on {jax.devices()[0].platform}")

    encoding = get_encoding()
    tokens = np.array([encoding.encode(args.prompt)], np.int32)
    start = time.perf_counter()
    logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens)[0, -1], np.float32)
    print(f"forward over {tokens.shape[1]} tokens in {time.perf_counter() - start:.1f}s (compile included)")
    for token in np.argsort(logits)[::-1][:5]:
        print(f"  {logits[token]:8.3f}  {encoding.decode([int(token)])!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
