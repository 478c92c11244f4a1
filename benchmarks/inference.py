"""Prefill and decode speed on the CPU, ours vs transformers, same weights, in one process.

Model: 4 layers, hidden 512, 16 experts (top 4), the real 201,088-token vocabulary, float32. Prefill: one
1024- and one 8192-token prompt, both sides computing the last position's logits only. Decode: batch 1, 64 greedy
tokens after a 32-token prompt (the KV cache on both sides). transformers runs with each of its CPU experts
implementations ("eager", "grouped_mm"; attention "eager": its sinks rule out sdpa, and flex attention with sinks
needs a GPU) and the faster of the two is the reference. Also ours alone: a decode step of 16 rows (160-token prompts)
in a cache of 256 and of 4,096 slots — a step attends over every slot, and should cost little more for the larger
one (no copies of the cache: it writes one position a row). The machine's limits are measured in the same run: a
2048^3 float32 matmul (FLOP/s) and reading a 1 GiB array (bytes/s). Prefill is compared with the matmul rate
(FLOPs / time); decode at batch 1 with the bandwidth (the weight bytes a token reads / time). The process runs
with `reuse_freed_memory()`'s malloc settings, as `gptoss-jax` does (both sides: they share the process).

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
from gptoss_jax.allocator import reuse_freed_memory  # noqa: E402
from gptoss_jax.generation import Generator  # noqa: E402

from hf_models import random_hf_model  # noqa: E402

SIZES = dict(num_hidden_layers=4, hidden_size=512, intermediate_size=512, head_dim=64, num_attention_heads=8,
             num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=4, vocab_size=201088,
             sliding_window=128)
PREFILLS, PROMPT, DECODE = (1024, 8192), 32, 64
CAPACITIES, ROWS, ROW_PROMPT = (256, 4096), 16, 160
PEER_EXPERTS = ("eager", "grouped_mm")


def machine_limits() -> tuple[float, float]:
    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    flops = 2 * 2048**3 / seconds(lambda: matmul(a).block_until_ready(), 10)
    big = jnp.ones((2**28,), jnp.float32)  # 1 GiB, read once (a decode step reads its weights once)
    total = jax.jit(jnp.sum)
    bandwidth = big.nbytes / seconds(lambda: total(big).block_until_ready(), 5)
    return flops, bandwidth


def prefill_flops(config, length: int) -> float:
    """FLOPs per prefill token of the float32 model. A prefill needs the logits of its last position only: the
    unembedding counts once per prompt, not per token. Attention: QK^T and PV over the keys a query sees on
    average (the window on banded layers, half the prompt on full ones)."""
    _, active = gptoss_jax.parameter_counts(config)
    unembedding = config.vocab_size * config.hidden_size
    seen = sum(min(length, config.sliding_window) if layer % 2 == 0 else length / 2
               for layer in range(config.num_hidden_layers))
    attention = 2 * 2 * config.num_attention_heads * config.head_dim * seen
    return 2 * (active - unembedding) + 2 * unembedding / length + attention


def decode_bytes(config) -> float:
    """Weight bytes a decoded token reads: the active weights and one embedding row, float32."""
    _, active = gptoss_jax.parameter_counts(config)
    return 4 * (active + config.hidden_size)


def _decode_seconds(generator: Generator, prompts: list[list[int]], cache_length: int | None = None) -> float:
    """Seconds per decode step: from the first sampled token (after the prefill) to the last."""
    stamps = []
    generator.generate(prompts, DECODE + 1, stop_tokens=[], cache_length=cache_length,
                       stream=lambda row, token: row == 0 and stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[0]) / DECODE


def main():
    reuse_freed_memory()  # as `gptoss-jax` does, before the first computation; transformers runs under it too
    torch.set_num_threads(os.cpu_count())
    hf = random_hf_model(seed=0, **SIZES).eval()
    rng = np.random.default_rng(0)
    long_prompts = {length: rng.integers(0, SIZES["vocab_size"], length).tolist() for length in PREFILLS}
    short_prompt = rng.integers(0, SIZES["vocab_size"], PROMPT).tolist()
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        model = gptoss_jax.load_model(directory, dtype="float32")
    generator = Generator(model)

    ours = {length: seconds(lambda p=prompt: generator.generate([p], 1, stop_tokens=[]), 3)
            for length, prompt in long_prompts.items()}
    ours["decode"] = min(_decode_seconds(generator, [short_prompt]) for _ in range(3))
    rows = rng.integers(0, SIZES["vocab_size"], (ROWS, ROW_PROMPT)).tolist()
    steps = {capacity: min(_decode_seconds(generator, rows, capacity) for _ in range(3)) for capacity in CAPACITIES}

    theirs = {}
    with torch.no_grad():
        short_ids = torch.tensor([short_prompt])
        for experts in PEER_EXPERTS:
            hf.set_experts_implementation(experts)
            for length, prompt in long_prompts.items():  # the last position's logits, as ours
                ids = torch.tensor([prompt])
                theirs[experts, length] = seconds(lambda ids=ids: hf(ids, logits_to_keep=1), 3)
            one = seconds(lambda: hf.generate(short_ids, max_new_tokens=1, min_new_tokens=1, do_sample=False,
                                              eos_token_id=None, pad_token_id=0), 3)
            many = seconds(lambda: hf.generate(short_ids, max_new_tokens=DECODE + 1, min_new_tokens=DECODE + 1,
                                               do_sample=False, eos_token_id=None, pad_token_id=0), 3)
            theirs[experts, "decode"] = (many - one) / DECODE

    flops, bandwidth = machine_limits()
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"torch {torch.__version__}; model {SIZES}, float32")
    print(f"machine: {flops / 1e9:.1f} GFLOP/s (2048^3 matmul), {bandwidth / 1e9:.1f} GB/s (reading 1 GiB)")
    for case in (*PREFILLS, "decode"):
        tokens = 1 if case == "decode" else case
        peer = {experts: tokens / theirs[experts, case] for experts in PEER_EXPERTS}
        best = max(peer, key=peer.get)
        ours_rate = tokens / ours[case]
        if case == "decode":
            name, work, limit, ceiling = "decode, batch 1", decode_bytes(model.config), "of the read bound", bandwidth
        else:
            name, work, limit = f"prefill {case}", prefill_flops(model.config, case), "of the matmul rate"
            ceiling = flops
        peers = ", ".join(f"{experts} {rate:9.1f}" for experts, rate in peer.items())
        print(f"{name:15s} ours {ours_rate:9.1f} tok/s ({work * ours_rate / ceiling:.0%} {limit})   transformers "
              f"[{peers}] tok/s ({work * peer[best] / ceiling:.0%})   ratio {ours_rate / peer[best]:.2f}x over {best}")
    small, large = CAPACITIES
    print(f"decode step, batch {ROWS}: {steps[small] * 1e3:.1f} ms at {small} slots, {steps[large] * 1e3:.1f} ms at "
          f"{large}: {steps[large] / steps[small]:.2f}x")


if __name__ == "__main__":
    main()
