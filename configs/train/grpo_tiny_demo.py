"""GRPO on a CPU in minutes: the tiny demo model (what `configs/train/tiny_demo.py` exports) is trained by
reinforcement alone to answer its counting questions at LOW reasoning effort, where it starts at 23% to 40%.

    gptoss-jax train --config configs/train/tiny_demo.py        # first: the supervised demo (runs/tiny_demo/merged)
    gptoss-jax train --config configs/train/grpo_tiny_demo.py

Each step samples 8 completions of 8 questions (48 tokens at most), rewards a correct final answer (the task's
numeric grader), and updates every parameter on the group-normalised advantages (DAPO's token-level average and
clip-higher; no KL); about 8 s a step on 2 CPU cores. The reward rises when the policy finds that writing the
count out at low effort pays (completions grow from 16 to ~37 tokens): with an earlier demo model (~40% at low),
in the first trial at this learning rate that happened after ~30 steps and the reward went from ~0.4 to ~0.9; it
is a chance event, and other runs did not find it within 50 steps (benchmarks/RESULTS.md has the runs).
"""

from gptoss_jax.train.config import defaults


def get_config():
    c = defaults()
    c.method = "grpo"
    c.model.checkpoint = "runs/tiny_demo/merged"
    c.grpo.task = "synthetic"  # training questions: data.synthetic.num_train of seed data.synthetic.seed
    c.data.synthetic.seed = 5  # other questions than the supervised demo trained on
    c.grpo.prompts_per_step = 8
    c.grpo.group_size = 8
    c.grpo.max_completion_tokens = 48
    c.grpo.efforts = ("low",)
    c.grpo.rewards = ("grader",)
    c.grpo.normalisation = "token"
    c.grpo.epsilon_high = 0.28
    c.grpo.eval_tasks = ("synthetic",)
    c.grpo.eval_efforts = ("low",)
    c.grpo.eval_limit = 60
    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.min_lr_ratio = 1.0  # constant
    c.optimizer.weight_decay = 0.0
    c.train.steps = 50
    c.train.log_every = 1
    c.train.eval_every = 25
    c.train.checkpoint_every = 10
    c.train.output_dir = "runs/grpo_tiny_demo"
    c.export.merged = True
    return c
