"""Server throughput and latency under N concurrent requests vs `Generator.generate` on the same batch.

A random tiny gpt-oss (the tiny preset's sizes, real vocabulary, float32) saved as a checkpoint; `gptoss-jax
serve` runs it in its own process on 127.0.0.1 with N slots; N threads send one request each through the
`openai` client (64 new tokens, temperature 0). The same N prompts then go through `Generator.generate` in this
process as one batch. The ratio of the two token rates is the server's overhead (HTTP, JSON, per-step
scheduling, requests split over several prefills).

    python benchmarks/server.py [N]
"""

import concurrent.futures
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import jax  # noqa: E402
import openai  # noqa: E402

import gptoss_jax  # noqa: E402
from gptoss_jax import harmony  # noqa: E402
from gptoss_jax.generation import Generator  # noqa: E402

from helpers import serving  # noqa: E402
from hf_models import random_hf_model  # noqa: E402

NEW_TOKENS = 64


def main(concurrency: int = 16):
    questions = [f"Question {i}: what is {i} plus {i + 3}?" for i in range(concurrency)]
    with tempfile.TemporaryDirectory() as directory:
        random_hf_model(seed=0, num_hidden_layers=4, hidden_size=64, intermediate_size=64, head_dim=16,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=4,
                        vocab_size=201088, sliding_window=32).save_pretrained(directory)
        with serving(directory, "--slots", str(concurrency), "--max-context", "256") as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

            def ask(question, max_tokens=NEW_TOKENS):
                started = time.perf_counter()
                response = client.chat.completions.create(
                    model="demo", messages=[{"role": "user", "content": question}], temperature=0,
                    max_tokens=max_tokens, stop=None)
                return time.perf_counter() - started, response.usage.completion_tokens

            # Compile before timing: requests that arrive together are prefilled together, and how a burst splits
            # between engine steps varies, so bursts of every size from 1 to N (two tokens each: a prefill, a
            # decode) compile every prefill batch, row gather and sampling shape the timed burst can meet.
            with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                for size in range(1, concurrency + 1):
                    list(pool.map(lambda question: ask(question, max_tokens=2), questions[:size]))
            ask(questions[0])
            with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                started = time.perf_counter()
                results = list(pool.map(ask, questions))
                server_seconds = time.perf_counter() - started

        generator = Generator(gptoss_jax.load_model(directory, dtype="float32"))
        prompts = [harmony.encode_chat({"messages": [{"role": "user", "content": q}]}) for q in questions]
        generator.generate(prompts, NEW_TOKENS)  # compile
        started = time.perf_counter()
        direct = generator.generate(prompts, NEW_TOKENS)
        direct_seconds = time.perf_counter() - started

    server_tokens = sum(tokens for _, tokens in results)
    latencies = sorted(seconds for seconds, _ in results)
    direct_tokens = sum(map(len, direct))
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}; "
          f"{concurrency} concurrent requests, up to {NEW_TOKENS} new tokens each, tiny model, float32")
    print(f"server: {server_tokens} tokens in {server_seconds:.2f}s = {server_tokens / server_seconds:.1f} tok/s; "
          f"latency p50 {statistics.median(latencies):.2f}s, p95 {latencies[int(0.95 * (len(latencies) - 1))]:.2f}s")
    print(f"generate (one batch): {direct_tokens} tokens in {direct_seconds:.2f}s = "
          f"{direct_tokens / direct_seconds:.1f} tok/s")
    print(f"server / direct throughput: {(server_tokens / server_seconds) / (direct_tokens / direct_seconds):.2f}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
