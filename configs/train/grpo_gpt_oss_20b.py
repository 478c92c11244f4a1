"""GRPO with LoRA on gpt-oss-20b, on GSM8K's training questions, the base kept in MXFP4 on one GPU.

Each step samples 8 completions (up to 1024 tokens, medium effort) of 2 questions from the policy itself (the
`Generator` on the training parameters: no second engine, no second copy of the weights) and rewards a correct
final answer (GSM8K's numeric grader) plus well-formed harmony. The KL reference is the base with the adapters
off. `gptoss-jax plan --config configs/train/grpo_gpt_oss_20b.py` gives its memory per device.

GSM8K from the hub needs the data extra (Parquet); offline, point grpo.source at a local copy (a JSONL of
{question, answer} rows, or the dataset's directory).
"""

from gptoss_jax.train.config import defaults


def get_config():
    c = defaults()
    c.method = "grpo"
    c.model.checkpoint = "openai/gpt-oss-20b"  # HF layout, MXFP4 experts
    c.model.mxfp4 = "packed"  # the frozen base stays MXFP4 in device memory
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "full"  # keep only each layer's input for the backward pass
    c.lora.enabled = True
    c.lora.rank = 8
    c.lora.alpha = 16.0
    # Attention only (what PEFT's "all-linear" gives on gpt-oss, as TRL's recipes train): `plan` puts this run at
    # 15.8 GiB a GPU; adapters on the experts too (+ "gate_up_proj", "down_proj") at 17.1 GiB.
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    c.grpo.task = "gsm8k"
    c.grpo.source = "openai/gsm8k"
    c.grpo.split = "main/train"
    c.grpo.prompts_per_step = 2
    c.grpo.group_size = 8
    c.grpo.max_prompt_tokens = 320  # GSM8K questions take up to ~300 harmony tokens
    c.grpo.max_completion_tokens = 1024
    c.grpo.efforts = ("medium",)
    c.grpo.rewards = ("grader", "format")
    c.grpo.reward_weights = (1.0, 0.1)
    c.grpo.overlong = "penalty"  # a completion cut at 1024 tokens has no answer: reward 0 rather than noise
    c.grpo.overlong_reward = 0.0
    c.grpo.beta = 0.04  # KL to the base (adapters off)
    c.grpo.epsilon_high = 0.28
    c.grpo.normalisation = "token"
    c.grpo.eval_tasks = ("gsm8k",)
    c.grpo.eval_efforts = ("low", "medium")
    c.grpo.eval_limit = 100
    c.grpo.eval_max_tokens = 2048
    c.optimizer.grad_accum = 16  # the update's 16 completions one at a time (the activations of one)
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.0
    c.train.steps = 500
    c.train.log_every = 1
    c.train.eval_every = 50
    c.train.checkpoint_every = 25
    c.train.output_dir = "runs/grpo_gpt_oss_20b"
    c.export.adapter = True
    c.export.merged = False
    return c
