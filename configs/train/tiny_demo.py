"""The embedded default: fully fine-tune the tiny gpt-oss on the synthetic counting reasoning set, on a CPU.

`gptoss-jax train --config configs/train/tiny_demo.py` generates the data (train and held-out JSONL under
train.output_dir), trains from random weights for a few minutes, and exports the model as an HF checkpoint.
Every setting and its meaning: `gptoss_jax.train.config.defaults()`, whose values are this run's.
"""

from gptoss_jax.train.config import defaults


def get_config():
    return defaults()
