"""The embedded default: the tiny demo model (`gptoss-jax train --config configs/train/tiny_demo.py` writes it to
runs/tiny_demo/merged) on 200 held-out counting questions at low, medium and high effort, greedy, on a CPU.
Every setting and its meaning: `gptoss_jax.eval.sweep.defaults()`, whose values are this sweep's.
"""

from gptoss_jax.eval.sweep import defaults


def get_config():
    return defaults()
