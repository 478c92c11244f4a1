"""What `serve --max-context` costs a request: the same short request at two contexts, and their ratio.

A random tiny gpt-oss (the tiny preset's sizes, real vocabulary, 131,072 positions, float32) served in its own
process on 127.0.0.1 with 4 slots, once per `--max-context`; one warm-up request, then 3 timed requests of a
30-token greedy reply (the stop tokens banned by logit_bias, so every reply is 30 tokens) through the `openai`
client. Before the cache grew on demand (2aae7f6 and earlier) it was allocated and attended at full size.

    python benchmarks/max_context.py [SMALL LARGE]     # default 8192 131072
"""

import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import openai  # noqa: E402

from helpers import serving  # noqa: E402
from hf_models import random_hf_model  # noqa: E402

NEW_TOKENS = 30
UNSTOPPABLE = {"200002": -100, "200012": -100, "200007": -100}  # <|return|>, <|call|>, <|end|>


def seconds_per_request(checkpoint: str, context: int) -> list[float]:
    with serving(checkpoint, "--slots", "4", "--max-context", str(context)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def ask() -> float:
            started = time.perf_counter()
            reply = client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "Count the rs: r, x, r."}], temperature=0,
                max_tokens=NEW_TOKENS, logit_bias=UNSTOPPABLE)
            assert reply.usage.completion_tokens == NEW_TOKENS
            return time.perf_counter() - started

        ask()  # compiles
        return [ask() for _ in range(3)]


def main(small: int = 8192, large: int = 131072):
    with tempfile.TemporaryDirectory() as directory:
        random_hf_model(seed=0, num_hidden_layers=4, hidden_size=64, intermediate_size=64, head_dim=16,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=4,
                        vocab_size=201088, sliding_window=32, max_position_embeddings=131072).save_pretrained(
            directory)
        times = {context: seconds_per_request(directory, context) for context in (small, large)}
    print(f"{platform.processor() or platform.machine()}; {NEW_TOKENS}-token replies, 4 slots")
    print("| --max-context | seconds per request (3 runs) | median |")
    print("|---|---|---|")
    for context, runs in times.items():
        print(f"| {context:,} | {', '.join(f'{s:.2f}' for s in runs)} | {statistics.median(runs):.2f} |")
    print(f"ratio {large:,} / {small:,}: {statistics.median(times[large]) / statistics.median(times[small]):.2f}")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))
