"""Prefill and decode speed on the CPU, ours vs transformers, same weights, in one process.

Model: 4 layers, hidden 512, 16 experts (top 4), the real 201,088-token vocabulary, float32. Prefill: one
1024-token prompt, both sides computing the last position's logits only. Decode: batch 1, 64 greedy tokens after
a 32-token prompt (the KV cache on both sides). The machine's limits are measured in the same run: a 2048^3
float32 matmul (FLOP/s) and reading a 1 GiB array (bytes/s). Prefill is compared with the matmul rate (FLOPs /
time); decode at batch 1 with the bandwidth (the weight bytes a token reads / time).

    python benchmarks/inference.py
"""

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from timing import seconds  # noqa: E402

import gptoss_jax  # noqa: E402
from gptoss_jax.generation import Generator  # noqa: E402

from hf_models import random_hf_model  # noqa: E402

SIZES = dict(num_hidden_layers=4, hidden_size=512, intermediate_size=512, head_dim=64, num_attention_heads=8,
             num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=4, vocab_size=201088,
             sliding_window=128)
PREFILL, PROMPT, DECODE = 1024, 32, 64


def machine_limits() -> tuple[float, float]:
    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    flops = 2 * 2048**3 / seconds(lambda: matmul(a).block_until_ready(), 10)
    big = jnp.ones((2**28,), jnp.float32)  # 1 GiB, read once (a decode step reads its weights once)
    total = jax.jit(jnp.sum)
    bandwidth = big.nbytes / seconds(lambda: total(big).block_until_ready(), 5)
    return flops, bandwidth


def model_costs(config) -> tuple[float, float]:
    """(FLOPs per prefill token, weight bytes read per decoded token) of the float32 model. A prefill needs the
    logits of its last position only: the unembedding counts once per prompt, not per token."""
    _, active = gptoss_jax.parameter_counts(config)
    unembedding = config.vocab_size * config.hidden_size
    attention = 2 * config.num_attention_heads * config.head_dim * PREFILL / 2  # causal QK^T and PV, average
    flops = 2 * (active - unembedding) + 2 * unembedding / PREFILL + 2 * attention * config.num_hidden_layers
    return flops, 4 * (active + config.hidden_size)  # the active weights, and one embedding row


def _decode_seconds(generator: Generator, prompt: list[int]) -> float:
    """Seconds per decode step: from the first sampled token (after the prefill) to the last."""
    stamps = []
    generator.generate([prompt], DECODE + 1, stop_tokens=[], stream=lambda row, token: stamps.append(
        time.perf_counter()))
    return (stamps[-1] - stamps[0]) / DECODE


def main():
    torch.set_num_threads(os.cpu_count())
    hf = random_hf_model(seed=0, **SIZES).eval()
    rng = np.random.default_rng(0)
    long_prompt = rng.integers(0, SIZES["vocab_size"], PREFILL).tolist()
    short_prompt = rng.integers(0, SIZES["vocab_size"], PROMPT).tolist()
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        model = gptoss_jax.load_model(directory, dtype="float32")
    generator = Generator(model)

    ours_prefill = seconds(lambda: generator.generate([long_prompt], 1, stop_tokens=[]), 3)
    ours_decode = min(_decode_seconds(generator, short_prompt) for _ in range(3))

    with torch.no_grad():
        long_ids, short_ids = torch.tensor([long_prompt]), torch.tensor([short_prompt])
        their_prefill = seconds(lambda: hf(long_ids, logits_to_keep=1), 3)  # the last position's logits, as ours
        one = seconds(lambda: hf.generate(short_ids, max_new_tokens=1, min_new_tokens=1, do_sample=False,
                                          eos_token_id=None, pad_token_id=0), 3)
        many = seconds(lambda: hf.generate(short_ids, max_new_tokens=DECODE + 1, min_new_tokens=DECODE + 1,
                                           do_sample=False, eos_token_id=None, pad_token_id=0), 3)
        their_decode = (many - one) / DECODE

    flops, bandwidth = machine_limits()
    prefill_flops, decode_bytes = model_costs(model.config)
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"torch {torch.__version__}; model {SIZES}, float32")
    print(f"machine: {flops / 1e9:.1f} GFLOP/s (2048^3 matmul), {bandwidth / 1e9:.1f} GB/s (reading 1 GiB)")
    for name, seconds_ours, seconds_theirs, tokens in (("prefill", ours_prefill, their_prefill, PREFILL),
                                                       ("decode", ours_decode, their_decode, 1)):
        ours_rate, their_rate = tokens / seconds_ours, tokens / seconds_theirs
        if name == "prefill":
            fraction = prefill_flops * ours_rate / flops
            their_fraction = prefill_flops * their_rate / flops
            limit = "of the matmul rate"
        else:
            fraction = decode_bytes * ours_rate / bandwidth
            their_fraction = decode_bytes * their_rate / bandwidth
            limit = "of the bandwidth bound"
        print(f"{name:8s} ours {ours_rate:9.1f} tok/s ({fraction:.0%} {limit})   transformers {their_rate:9.1f} "
              f"tok/s ({their_fraction:.0%})   ratio {ours_rate / their_rate:.2f}x")


if __name__ == "__main__":
    main()
