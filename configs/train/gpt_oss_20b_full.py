"""Full fine-tuning of gpt-oss-20b on 8 GPUs of one host, parameters and optimizer state sharded (FSDP).

Mesh: fsdp=8. Experts are dequantized to train them and re-quantized to MXFP4 on export.
"""

from gptoss_jax.train.config import defaults


def get_config():
    c = defaults()
    c.model.checkpoint = "openai/gpt-oss-20b"  # HF layout, MXFP4 experts
    c.model.mxfp4 = "dequantize"  # trainable experts must be dense
    c.model.param_dtype = "float32"  # float32 master weights and Adam moments
    c.model.compute_dtype = "bfloat16"  # bf16 forward and backward
    c.model.remat = "full"  # keep only each layer's input
    c.lora.enabled = False  # every parameter trains
    c.data.train = "HuggingFaceH4/Multilingual-Thinking"  # hub dataset (Parquet: needs the data extra)
    c.data.eval = ""  # no held-out set in that dataset
    c.data.seq_len = 2048  # tokens per row
    c.data.batch_size = 8  # one row per device per micro-batch
    c.optimizer.grad_accum = 2  # 16 rows per step
    c.optimizer.learning_rate = 1e-5  # full fine-tuning peak learning rate
    c.optimizer.warmup_steps = 20  # linear warmup
    c.train.steps = 300  # optimizer steps
    c.train.log_every = 5  # steps between metric lines
    c.train.eval_every = 100  # unused without eval data
    c.train.checkpoint_every = 100  # steps between checkpoints
    c.train.output_dir = "runs/gpt_oss_20b_full"  # checkpoints, metrics, exports
    c.mesh.data = 1  # no data parallelism beyond FSDP
    c.mesh.fsdp = 8  # parameters, gradients and optimizer state sharded over the 8 GPUs
    c.export.merged = True  # write the fine-tuned model as an HF checkpoint
    c.export.mxfp4 = True  # experts re-quantized to MXFP4, as released
    return c
