"""The same sweep against any OpenAI-compatible endpoint — `gptoss-jax serve`, vLLM, ... — which receives each
request's `reasoning_effort`. Start the server first, e.g. `gptoss-jax serve --checkpoint openai/gpt-oss-20b`,
then `gptoss-jax eval --config configs/eval/endpoint.py [--config.endpoint.base_url=http://HOST:PORT/v1]`.
"""

from gptoss_jax.eval.sweep import defaults


def get_config():
    config = defaults()
    config.backend = "openai"
    config.endpoint.base_url = "http://127.0.0.1:8000/v1"
    config.tasks = ("aime", "gpqa", "gsm8k")
    config.samples = 4
    config.max_tokens = 32768
    config.temperature = 1.0
    config.batch_size = 64  # requests in flight at once
    config.output_dir = "runs/eval/endpoint"
    return config
