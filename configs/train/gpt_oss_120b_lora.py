"""LoRA on gpt-oss-120b on one 80 GB GPU, the base kept in MXFP4 (60.8 GiB): attention adapters only.

Mesh: one device. Starts from the 20b LoRA run's settings (configs/train/gpt_oss_20b_lora.py).
"""

from pathlib import Path

from gptoss_jax.train.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("gpt_oss_20b_lora.py"))
    c.model.checkpoint = "openai/gpt-oss-120b"  # HF layout, MXFP4 experts
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")  # attention only: expert adapters would not fit
    c.data.seq_len = 1024  # shorter rows leave room for the 120b activations
    c.optimizer.grad_accum = 16  # 16 rows (16k tokens) per step
    c.train.output_dir = "runs/gpt_oss_120b_lora"  # checkpoints, metrics, exports
    return c
