"""The `gptoss-jax` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time

PRESETS = {"tiny": "tiny", "gpt-oss-20b": "gpt_oss_20b", "gpt-oss-120b": "gpt_oss_120b"}


def main(argv: list[str] | None = None) -> int:
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
    source.add_argument("--checkpoint", metavar="DIR", help="an HF-format checkpoint directory")
    inspect.add_argument("--prompt", default="The capital of France is")
    inspect.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _inspect(args)
    except (ValueError, OSError) as error:  # ConfigError and CheckpointError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 2


def _inspect(args: argparse.Namespace) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from gptoss_jax import GptOss, GptOssConfig, load_model, parameter_counts
    from gptoss_jax.tokenizer import get_encoding

    if args.checkpoint:
        config = GptOssConfig.from_pretrained(args.checkpoint)
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
