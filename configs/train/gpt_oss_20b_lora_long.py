"""LoRA on gpt-oss-20b at its whole context, 131,072 tokens a row, on one 80 GB GPU: configs/train/gpt_oss_20b_lora.py
(adapters on attention and every expert, the MXFP4 base kept packed) with long-context settings.

What makes the row fit (`gptoss-jax plan --config this --target h100`: 28.7 GiB per H100, against 99.5 GiB with
`remat = "full"` and the experts all at once): each layer's input is kept in the host's pinned memory for the
backward pass instead of the GPU's (`model.remat = "offload"`), and the experts take 8,192 tokens at a time, each
tile recomputed in the backward (`model.moe_tile`). The data must hold long conversations: rows are packed to
131,072 tokens.
"""

from pathlib import Path

from gptoss_jax.settings import read_config


def get_config():
    c = read_config(Path(__file__).with_name("gpt_oss_20b_lora.py"))
    c.model.remat = "offload"  # keep only each layer's input for the backward pass, in host memory
    c.model.moe_tile = 8192  # the experts 8,192 tokens at a time: no [131,072 x 4 x 5,760] buffers
    c.data.train = "train.jsonl"  # harmony JSONL of long conversations (records longer than a row are truncated)
    c.data.seq_len = 131072  # tokens per row: the model's whole context
    c.optimizer.grad_accum = 1  # one row (131k tokens) per step
    c.optimizer.learning_rate = 1e-4  # LoRA peak learning rate
    c.optimizer.warmup_steps = 10  # linear warmup
    c.train.steps = 200  # optimizer steps
    c.train.log_every = 1  # steps between metric lines
    c.train.checkpoint_every = 25  # steps between checkpoints
    c.train.output_dir = "runs/gpt_oss_20b_lora_long"  # checkpoints, metrics, exports
    return c
