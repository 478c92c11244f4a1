"""LoRA on gpt-oss-20b on one 80 GB GPU, the base kept in MXFP4 (12.8 GiB), on HF's Multilingual-Thinking.

Mesh: one device. Adapters on attention and on every expert (per-expert, as PEFT's target_parameters).
Other settings: `gptoss_jax.train.config.defaults()`.
"""

from gptoss_jax.train.config import defaults


def get_config():
    c = defaults()
    c.model.checkpoint = "openai/gpt-oss-20b"  # HF layout, MXFP4 experts
    c.model.mxfp4 = "packed"  # the frozen base stays MXFP4 in device memory
    c.model.compute_dtype = "bfloat16"  # forward pass in bf16 (norms, softmax, router in float32)
    c.model.remat = "full"  # keep only each layer's input for the backward pass
    c.lora.enabled = True  # train adapters only
    c.lora.rank = 8  # adapter rank
    c.lora.alpha = 16.0  # updates scaled by alpha / rank = 2
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")  # attention + experts
    c.data.train = "HuggingFaceH4/Multilingual-Thinking"  # hub dataset (Parquet: needs the data extra)
    c.data.eval = ""  # no held-out set in that dataset
    c.data.seq_len = 2048  # tokens per row
    c.data.batch_size = 1  # rows per micro-batch
    c.optimizer.grad_accum = 8  # 8 rows (16k tokens) per step
    c.optimizer.learning_rate = 2e-4  # LoRA peak learning rate
    c.optimizer.warmup_steps = 20  # linear warmup
    c.optimizer.weight_decay = 0.0  # no decay on adapters
    c.train.steps = 500  # optimizer steps (about 3 epochs of Multilingual-Thinking)
    c.train.log_every = 5  # steps between metric lines
    c.train.eval_every = 100  # unused without eval data
    c.train.checkpoint_every = 100  # steps between checkpoints
    c.train.output_dir = "runs/gpt_oss_20b_lora"  # checkpoints, metrics, exports
    c.export.adapter = True  # PEFT adapter directory
    c.export.merged = False  # merging writes a second 13 GB checkpoint: opt in with --config.export.merged=true
    c.export.mxfp4 = True  # merged experts re-quantized to MXFP4, as released
    return c
