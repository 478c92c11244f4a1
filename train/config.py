"""Training run configs: every setting with its meaning (`defaults()`), and the checks a run's config must pass.
The files themselves are read by `gptoss_jax.settings` (python files with `get_config()`, `--config.a.b=value`
overrides); unknown keys and out-of-range values are errors that name the key."""

from __future__ import annotations

import os

import ml_collections

from gptoss_jax.settings import ConfigError, read_config, setting

_CHOICES = {
    "model.preset": ("tiny", "gpt_oss_20b", "gpt_oss_120b"),
    "model.mxfp4": ("packed", "dequantize"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots", "attention", "offload"),
    "model.kernels": ("xla", "pallas", "auto"),
    "data.train_on": ("assistant", "final", "all_assistant_turns"),
    "data.overlong": ("truncate", "drop"),
    "data.shuffle": ("examples", "rows"),
    "method": ("sft", "grpo"),
    "grpo.scale": ("group", "batch", "none"),
    "grpo.normalisation": ("sequence", "token", "dr_grpo"),
    "grpo.overlong": ("keep", "penalty", "mask"),
    "grpo.reward_errors": ("zero", "raise"),
}
REPORT_TO = ("tensorboard", "wandb")
_POSITIVE = ("data.seq_len", "data.batch_size", "optimizer.grad_accum", "train.steps", "train.log_every",
             "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints", "optimizer.learning_rate",
             "grpo.prompts_per_step", "grpo.group_size", "grpo.max_prompt_tokens", "grpo.max_completion_tokens",
             "grpo.inner_steps", "grpo.eval_max_tokens")


def defaults() -> ml_collections.ConfigDict:
    """Every setting, with what it means; the values are the embedded tiny demo's (configs/train/tiny_demo.py).
    Config files start from these and change what their run needs."""
    ConfigDict = ml_collections.ConfigDict
    c = ConfigDict()
    c.method = "sft"  # sft: supervised fine-tuning on data.* | grpo: reinforcement learning on grpo.* (below)

    c.model = ConfigDict()
    c.model.checkpoint = ""  # base checkpoint (directory or hub id); empty: the preset below, random weights
    c.model.preset = "tiny"  # tiny | gpt_oss_20b | gpt_oss_120b — used when there is no checkpoint
    c.model.mxfp4 = "dequantize"  # MXFP4 experts: "packed" (frozen base, LoRA) or "dequantize" (trainable)
    c.model.param_dtype = "float32"  # dtype of the trainable (master) parameters
    c.model.compute_dtype = "float32"  # dtype of the forward pass (float32 is the fast one on a CPU)
    c.model.remat = "none"  # recompute in the backward pass: none | full (per layer) | dots | attention (keep it)
    # | offload (as full, the layer inputs kept in host memory: long sequences on a GPU)
    c.model.kernels = "auto"  # attention and packed MXFP4 experts: auto (the Pallas kernels on a GPU, XLA elsewhere)
    # | xla | pallas (the kernels everywhere; interpret mode off a GPU: slow, for testing)
    c.model.moe_tile = 0  # tokens the experts take at a time (each tile recomputed in the backward); 0: all at once

    c.lora = ConfigDict()
    c.lora.enabled = False  # False: full fine-tuning (every parameter trains)
    c.lora.rank = 8  # adapter rank
    c.lora.alpha = 16.0  # updates scaled by alpha / rank
    c.lora.dropout = 0.0  # dropout on adapter inputs (attention targets only)
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")  # patterns over q/k/v/o_proj, router, *_proj

    c.data = ConfigDict()
    c.data.train = "synthetic"  # JSONL file, dataset directory, HF dataset id, or "synthetic" (generated)
    c.data.eval = "synthetic"  # held-out data (same kinds); empty: no evaluation
    c.data.synthetic = ConfigDict()
    c.data.synthetic.num_train = 2000  # records generated for training (the demo's 400 steps read each once)
    c.data.synthetic.num_eval = 120  # records generated for evaluation
    c.data.synthetic.seed = 0  # generator seed (the eval set uses seed + 1)
    c.data.seq_len = 640  # tokens per packed row (a demo row: the five records of one round of efforts)
    c.data.batch_size = 1  # rows per micro-batch
    c.data.train_on = "assistant"  # assistant | final | all_assistant_turns
    c.data.overlong = "truncate"  # examples longer than a row: truncate | drop
    c.data.skip_invalid = False  # skip (and count) invalid records instead of stopping
    c.data.shuffle = "rows"  # each epoch, shuffle: rows (pack the records in their order, then shuffle the rows:
    # neighbouring records share a row, as the demo's round of efforts does) | examples (before packing)
    c.data.seed = 0  # shuffle seed (epoch e uses seed + e)

    c.optimizer = ConfigDict()
    c.optimizer.learning_rate = 3e-3  # peak learning rate
    c.optimizer.warmup_steps = 10  # linear warmup from 0
    c.optimizer.min_lr_ratio = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    c.optimizer.weight_decay = 0.01  # AdamW decay, on matrices only
    c.optimizer.b1 = 0.9  # Adam beta1
    c.optimizer.b2 = 0.95  # Adam beta2
    c.optimizer.eps = 1e-8  # Adam epsilon
    c.optimizer.clip_norm = 1.0  # global gradient-norm clipping
    c.optimizer.grad_accum = 1  # micro-batches per step

    c.loss = ConfigDict()
    c.loss.z_loss_weight = 0.0  # router z-loss weight
    c.loss.aux_loss_weight = 0.0  # router load-balancing loss weight

    c.train = ConfigDict()
    c.train.steps = 400  # optimizer steps (the demo model counts reliably from about here)
    c.train.seed = 0  # parameter init, adapter init and dropout seed
    c.train.log_every = 10  # steps between metric lines (JSONL + TensorBoard)
    c.train.eval_every = 100  # steps between held-out evaluations
    c.train.eval_batches = 4  # batches per evaluation
    c.train.checkpoint_every = 200  # steps between orbax checkpoints
    c.train.keep_checkpoints = 2  # checkpoints kept
    c.train.async_checkpoints = True  # write checkpoints in the background
    c.train.output_dir = "runs/tiny_demo"  # checkpoints, metrics, TensorBoard events, exports
    # where metrics go besides metrics.jsonl: "tensorboard", "wandb" (Weights & Biases: pip install wandb; its
    # project, entity and mode from WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE), both comma-separated, or "none"
    c.train.report_to = "tensorboard"
    c.train.qat = False  # quantization-aware training: the experts' forward sees them as the MXFP4 export will hold
    # them (adapter updates merged, then quantized and dequantized), gradients pass straight through to the float
    # weights or adapters; needs export.mxfp4 = true. Without it an MXFP4 export rounds what was learned afterwards.

    c.mesh = ConfigDict()
    c.mesh.data = 1  # data-parallel devices
    c.mesh.fsdp = -1  # parameter-sharded (FSDP) devices; -1: all the devices left
    c.mesh.expert = 1  # expert-parallel devices
    c.mesh.tensor = 1  # tensor-parallel devices

    # Reinforcement learning (method = "grpo"): each step samples group_size completions of prompts_per_step prompts
    # from the policy being trained, scores them with the rewards, and updates on the group-normalised advantages
    # (gptoss_jax.train.grpo explains the loss; its options mean what TRL's GRPOTrainer's do). data.seed shuffles
    # the prompts; optimizer.grad_accum splits an update's completions into that many micro-batches.
    c.grpo = ConfigDict()
    c.grpo.task = "synthetic"  # gsm8k | math | aime | gpqa | synthetic | a JSONL of {prompt, answer, grader}
    c.grpo.source = ""  # gsm8k/math/aime/gpqa: a local file or directory, or a hub id
    c.grpo.split = "train"  # files of the source whose path contains this
    c.grpo.prompts_per_step = 8  # prompts per step
    c.grpo.group_size = 8  # completions sampled per prompt (G)
    c.grpo.max_prompt_tokens = 256  # longer prompts (in harmony tokens) are left out of the run; plan's size
    c.grpo.max_completion_tokens = 48  # a longer completion is cut there (see overlong)
    c.grpo.efforts = ("low",)  # reasoning efforts asked for, cycled over the prompts (a mix: "low,medium,high")
    c.grpo.temperature = 1.0  # sampling temperature of the rollouts
    c.grpo.top_p = 1.0
    c.grpo.rewards = ("grader",)  # grader (the task's), grader:NAME, format, length, module:function
    c.grpo.reward_weights = (1.0,)  # one per reward; a completion's reward is the weighted sum
    c.grpo.reward_errors = "zero"  # a reward that raises: zero (scored 0, reported with the sample) | raise (stop)
    c.grpo.overlong = "keep"  # a completion cut by max_completion_tokens: keep its reward | penalty | mask (no loss)
    c.grpo.overlong_reward = -1.0  # overlong = "penalty": the reward a cut completion gets instead
    c.grpo.dynamic_sampling = False  # DAPO: leave out of the loss the groups whose rewards are all equal
    c.grpo.scale = "group"  # advantage = (reward - group mean) / std of: group | batch | none (Dr. GRPO)
    c.grpo.normalisation = "sequence"  # loss average: sequence (GRPO) | token (DAPO) | dr_grpo
    c.grpo.epsilon_low = 0.2  # ratio clipped to [1 - epsilon_low, 1 + epsilon_high]
    c.grpo.epsilon_high = 0.2  # DAPO's clip-higher: 0.28
    c.grpo.beta = 0.0  # KL(policy || reference) weight, k3 estimator; reference: LoRA off, or the starting weights
    c.grpo.inner_steps = 1  # optimizer updates on each batch of rollouts (TRL's num_iterations)
    c.grpo.eval_tasks = ()  # eval-harness tasks run every train.eval_every steps (e.g. "synthetic"); empty: none
    c.grpo.eval_efforts = ("low", "medium", "high")
    c.grpo.eval_limit = 60  # problems per eval task; 0: all
    c.grpo.eval_max_tokens = 160  # tokens per eval answer (greedy)

    c.export = ConfigDict()
    c.export.adapter = True  # LoRA only: write a PEFT adapter directory (output_dir/adapter)
    c.export.merged = True  # write an HF checkpoint with adapters merged (output_dir/merged)
    c.export.mxfp4 = False  # store the merged experts in MXFP4
    # a hub repo ("user/name") to upload the exports to once written (token: HF_TOKEN or `hf auth login`); "": none
    c.export.push_to_hub = ""
    c.export.hub_private = True  # a repo the push creates is private
    return c


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """A training config: the file's `get_config()` with `--config.a.b=value` overrides, validated."""
    config = read_config(path, overrides, reference=defaults())
    validate(config)
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every setting the trainer reads, naming the first bad one."""
    for key, choices in _CHOICES.items():
        if setting(config, key) not in choices:
            raise ConfigError(f"config.{key}: expected one of {choices}, got {setting(config, key)!r}")
    for key in _POSITIVE:
        if not setting(config, key) > 0:
            raise ConfigError(f"config.{key}: must be positive, got {setting(config, key)!r}")
    reports = set(config.train.report_to.split(","))
    if not reports <= set(REPORT_TO) and reports != {"none"}:
        raise ConfigError(f"config.train.report_to: comma-separated {' and '.join(REPORT_TO)}, or none; got "
                          f"{config.train.report_to!r}")
    if not 0 <= config.optimizer.min_lr_ratio <= 1:
        raise ConfigError(f"config.optimizer.min_lr_ratio: must be in [0, 1], got {config.optimizer.min_lr_ratio}")
    if config.optimizer.warmup_steps < 0 or config.optimizer.warmup_steps > config.train.steps:
        raise ConfigError(f"config.optimizer.warmup_steps: must be in [0, train.steps], got "
                          f"{config.optimizer.warmup_steps}")
    if not config.lora.enabled and config.model.mxfp4 == "packed":
        raise ConfigError("config.model.mxfp4: full fine-tuning trains the experts, which cannot stay packed; "
                          "use 'dequantize' (export can re-quantize them)")
    if config.train.qat and not config.export.mxfp4:
        raise ConfigError("config.train.qat: trains the experts as an MXFP4 export holds them; set export.mxfp4 = "
                          "true (without it the export keeps them unquantized, and QAT only costs accuracy)")
    if config.lora.enabled:
        from gptoss_jax.lora import LoraConfig

        try:
            LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
                       targets=tuple(config.lora.targets)).names()
        except ValueError as error:
            raise ConfigError(f"config.{error}") from None
    for axis in ("data", "fsdp", "expert", "tensor"):
        size = config.mesh[axis]
        if size == 0 or size < -1:
            raise ConfigError(f"config.mesh.{axis}: a device count, or -1 for the rest; got {size}")
    if sum(config.mesh[axis] == -1 for axis in ("data", "fsdp", "expert", "tensor")) > 1:
        raise ConfigError("config.mesh: at most one axis may be -1")
    if config.method == "grpo":
        _validate_grpo(config.grpo)


def _validate_grpo(grpo: ml_collections.ConfigDict) -> None:
    from gptoss_jax.harmony import EFFORTS
    from gptoss_jax.train import rewards

    if grpo.group_size < 2:
        raise ConfigError(f"config.grpo.group_size: a group needs at least 2 completions, got {grpo.group_size}")
    if not grpo.temperature > 0 or not 0 < grpo.top_p <= 1:
        raise ConfigError(f"config.grpo: rollouts are sampled: temperature > 0 and top_p in (0, 1] are required, "
                          f"got {grpo.temperature}, {grpo.top_p}")
    for key in ("efforts", "eval_efforts"):
        if not grpo[key] or any(effort not in EFFORTS for effort in grpo[key]):
            raise ConfigError(f"config.grpo.{key}: one or more of {EFFORTS}, got {grpo[key]}")
    if not grpo.rewards or len(grpo.rewards) != len(grpo.reward_weights):
        raise ConfigError(f"config.grpo.reward_weights: one weight per reward; {len(grpo.rewards)} rewards "
                          f"{tuple(grpo.rewards)}, {len(grpo.reward_weights)} weights")
    for index, name in enumerate(grpo.rewards):
        rewards.resolve(name, f"config.grpo.rewards[{index}]")
    for key in ("epsilon_low", "epsilon_high", "beta", "eval_limit"):
        if grpo[key] < 0:
            raise ConfigError(f"config.grpo.{key}: must be >= 0, got {grpo[key]}")
