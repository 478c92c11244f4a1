"""gpt-oss-20b in this process on AIME 2025, GPQA diamond and GSM8K at low, medium and high effort, sampled as the
gpt-oss evals sample (temperature 1). Needs a GPU (bf16, experts kept MXFP4) and the hub (or local copies:
--config.data.aime.source=FILE ...); GPQA is gated on the hub: log in with `huggingface-cli login` first.
Watch the truncated column: high effort on AIME needs long generations.
"""

from gptoss_jax.eval.sweep import defaults


def get_config():
    config = defaults()
    config.model.checkpoint = "openai/gpt-oss-20b"
    config.model.dtype = "bfloat16"
    config.tasks = ("aime", "gpqa", "gsm8k")
    config.samples = 4
    config.max_tokens = 32768
    config.temperature = 1.0
    config.batch_size = 64
    config.output_dir = "runs/eval/gpt_oss_20b"
    return config
