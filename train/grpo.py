"""GRPO's arithmetic: group-normalised advantages and the clipped policy-gradient loss over sampled tokens.

For each prompt, G completions are sampled from the policy and scored; a completion's advantage is its reward
minus its group's mean, divided by the group's standard deviation (`scale = "group"`, GRPO), the batch's
(`"batch"`) or nothing (`"none"`, Dr. GRPO). The loss per sampled token t of completion i is

    -min(r * A_i, clip(r, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_t,   r = exp(logp - logp_old)

with KL_t the k3 estimator exp(ref - logp) - (ref - logp) - 1 of KL(policy || reference), and it is averaged as
the configured normalisation says: "sequence" (each completion's mean, then the mean over completions: GRPO's
paper), "token" (the mean over all sampled tokens of the batch: DAPO) or "dr_grpo" (the sum divided by
completions x max completion length: Dr. GRPO). eps_high > eps_low is DAPO's asymmetric clipping ("clip-higher").
A completion masked whole (overlong = "mask", dynamic sampling) still counts among the completions divided by,
and tokens are scored at the sampling temperature (log_softmax(logits / T)). These are TRL's GRPOTrainer
definitions, so its users' settings mean the same here.

`train` is the loop `gptoss-jax train` runs for method = "grpo": per step, the prompts the step number selects,
`group_size` completions of each from a `Generator` holding the current parameters (no second engine, no copy of
the weights; rows seeded by (train.seed, step, row) so that a resumed run samples what the uninterrupted one
did), the rewards (`gptoss_jax.train.rewards`), then `inner_steps` updates, with the SFT trainer's checkpoints,
logging, NaN guard, SIGTERM and exports (`train.run.Run`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from gptoss_jax import harmony, sharding
from gptoss_jax.eval.backends import seed_of
from gptoss_jax.generation import Generator
from gptoss_jax.settings import ConfigError
from gptoss_jax.train import rewards as rewards_lib
from gptoss_jax.train import run as scaffold  # what every run has (train.run)
from gptoss_jax.train.loss import token_logprobs

log = logging.getLogger(__name__)

SCALES = ("group", "batch", "none")
NORMALISATIONS = ("sequence", "token", "dr_grpo")
STD_EPSILON = 1e-4  # added to the standard deviation, as TRL does: a group of equal rewards gets advantage 0


@dataclasses.dataclass(frozen=True)
class LossSettings:
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # DAPO's clip-higher: e.g. 0.28
    beta: float = 0.0  # KL penalty weight; 0 skips the reference's forward pass
    normalisation: str = "sequence"
    max_completion_length: int = 0  # dr_grpo's constant denominator (tokens per completion)
    # the sampling temperature: tokens are scored by log_softmax(logits / temperature), the distribution they were
    # sampled from (as TRL scores them), so the ratio and the gradient are those of the sampling policy
    temperature: float = 1.0

    def __post_init__(self):
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation: expected one of {NORMALISATIONS}, got {self.normalisation!r}")
        if self.normalisation == "dr_grpo" and self.max_completion_length < 1:
            raise ValueError("normalisation 'dr_grpo' needs max_completion_length")
        if self.epsilon_low < 0 or self.epsilon_high < 0 or self.beta < 0:
            raise ValueError(f"epsilon_low, epsilon_high and beta must be >= 0, got {self.epsilon_low}, "
                             f"{self.epsilon_high}, {self.beta}")


def group_advantages(rewards: jnp.ndarray, group_size: int, scale: str = "group") -> jnp.ndarray:
    """Advantages [N] of rewards [N] laid out prompt by prompt (each prompt's `group_size` completions together)."""
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {SCALES}, got {scale!r}")
    groups = rewards.reshape(-1, group_size)
    centred = (groups - groups.mean(axis=1, keepdims=True)).reshape(-1)
    if scale == "group":
        return centred / (jnp.repeat(groups.std(axis=1, ddof=1), group_size) + STD_EPSILON)
    if scale == "batch":
        return centred / (rewards.std(ddof=1) + STD_EPSILON)
    return centred


def informative_groups(rewards: jnp.ndarray, group_size: int) -> jnp.ndarray:
    """Per prompt, whether its completions' rewards differ (DAPO's dynamic sampling drops the groups that do
    not: their advantages are all zero and they only dilute the batch)."""
    groups = rewards.reshape(-1, group_size)
    return jnp.any(groups != groups[:, :1], axis=1)


def token_weights(mask, settings: LossSettings):
    """Each sampled token's weight in the loss [N, T] (0 off the mask), as the normalisation says. A completion
    with no token in the mask (left out by dynamic sampling or overlong masking) adds nothing but still counts
    among the N completions that "sequence" and "dr_grpo" divide by, as in TRL (its loss is 0, not absent).
    Computed over the whole batch, so that micro-batches' losses add up to the batch's."""
    mask = mask.astype(jnp.float32)
    counts = mask.sum(-1, keepdims=True)
    completions = mask.shape[0]
    if settings.normalisation == "sequence":
        return mask / (jnp.maximum(counts, 1) * completions)
    if settings.normalisation == "token":
        return mask / jnp.maximum(mask.sum(), 1)
    return mask / (completions * settings.max_completion_length)


def policy_loss(logprobs, old_logprobs, advantages, mask, settings: LossSettings, ref_logprobs=None, weights=None):
    """(loss, metrics) of completions [N, T]: the policy's log-probabilities of the sampled tokens (what the
    gradient flows through), those of the policy that sampled them, the advantages [N], a mask [N, T] of the
    sampled tokens, the reference's log-probabilities when beta > 0, and the tokens' weights (`token_weights` of
    the mask, unless this is a micro-batch of a larger batch). Metrics are means over this batch's tokens."""
    weights = token_weights(mask, settings) if weights is None else weights
    mask = mask.astype(logprobs.dtype)
    ratio = jnp.exp(logprobs - old_logprobs)
    advantage = advantages[:, None]
    clipped = jnp.clip(ratio, 1 - settings.epsilon_low, 1 + settings.epsilon_high)
    per_token = -jnp.minimum(ratio * advantage, clipped * advantage)
    metrics = {}
    if settings.beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs the reference's log-probabilities")
        delta = ref_logprobs - logprobs
        kl = jnp.exp(delta) - delta - 1
        per_token = per_token + settings.beta * kl
        metrics["kl"] = _token_mean(kl, mask)
    low = (ratio < 1 - settings.epsilon_low) & (advantage < 0)  # the clip binds: no gradient through the ratio
    high = (ratio > 1 + settings.epsilon_high) & (advantage > 0)
    metrics.update(clip_low=_token_mean(low, mask), clip_high=_token_mean(high, mask),
                   clip_fraction=_token_mean(low | high, mask))
    return jnp.sum(per_token * weights), metrics


def _token_mean(values, mask):
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1)


def completion_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                     length: int) -> dict[str, np.ndarray]:
    """Each prompt followed by its completion, right-padded to `length`, as the training forward reads it:
    inputs, positions, segment_ids (1: the sequence, 0: padding), targets (the next token) and `counted`, the
    positions whose target is a sampled token — the loss is over those only."""
    rows = len(prompts)
    batch = {"inputs": np.zeros((rows, length), np.int32), "targets": np.zeros((rows, length), np.int32),
             "segment_ids": np.zeros((rows, length), np.int32), "counted": np.zeros((rows, length), bool),
             "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()}
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        tokens = [*prompt, *completion]
        if len(tokens) > length or not prompt:
            raise ValueError(f"row {row}: a prompt of {len(prompt)} tokens and a completion of {len(completion)} "
                             f"do not fit {length} positions (or the prompt is empty)")
        batch["inputs"][row, :len(tokens)] = tokens
        batch["targets"][row, :len(tokens) - 1] = tokens[1:]
        batch["segment_ids"][row, :len(tokens)] = 1
        batch["counted"][row, len(prompt) - 1:len(tokens) - 1] = True
    return batch


def sequence_logprobs(model, batch, *, remat: str = "none", temperature: float = 1.0):
    """log p(token) of every sampled token [N, L] under `model` at `temperature` (log_softmax of the logits
    divided by it; 0 elsewhere): the training forward. Logits are linear in the final hidden state, so that is
    what is divided."""
    hidden, _ = model.hidden_states(batch["inputs"], positions=batch["positions"],
                                    segment_ids=batch["segment_ids"], remat=remat)
    hidden = hidden if temperature == 1.0 else hidden / jnp.asarray(temperature, hidden.dtype)
    return token_logprobs(hidden, model.unembedding[...], batch["targets"], batch["counted"])


@dataclasses.dataclass
class PolicySteps:
    """The compiled steps of a GRPO update: the log-probabilities of sampled tokens under some parameters (the
    policy before the update, or the reference), and one optimizer update on the clipped objective. Both go
    through the batch `micro_batches` rows-slices at a time (the update sums their gradients)."""

    logprobs: callable  # (master, frozen, batch) -> [N, L]
    # (master, opt_state, frozen, batch, old or None, ref or None, advantages) -> (master, opt_state, metrics);
    # old None: the policy that sampled is this one (one inner step: the ratio is 1, its gradient REINFORCE's)
    update: callable


def make_policy_steps(graphdef, dtypes, transform, settings: LossSettings, *, remat: str = "none",
                      micro_batches: int = 1) -> PolicySteps:
    def pieces(tree):
        return jax.tree.map(lambda a: a.reshape(micro_batches, -1, *a.shape[1:]), tree)

    def piece_logprobs(master, frozen, piece):
        params = jax.tree.map(lambda p, d: p.astype(d), master, dtypes)
        return sequence_logprobs(nnx.merge(graphdef, params, frozen), piece, remat=remat,
                                 temperature=settings.temperature)

    def logprobs(master, frozen, batch):
        scored = jax.lax.map(lambda piece: piece_logprobs(master, frozen, piece), pieces(batch))
        return scored.reshape(batch["counted"].shape)

    def update(master, opt_state, frozen, batch, old, ref, advantages):
        weights = token_weights(batch["counted"], settings)
        tokens = jnp.maximum(batch["counted"].sum(), 1)

        def objective(master, piece):
            scored = piece_logprobs(master, frozen, piece)
            sampler = jax.lax.stop_gradient(scored) if old is None else piece["old"]
            return policy_loss(scored, sampler, piece["advantages"], piece["counted"], settings,
                               ref_logprobs=piece.get("ref"), weights=piece["weights"])

        def accumulate(carry, piece):
            grads, loss, metrics = carry
            (piece_loss, piece_metrics), piece_grads = jax.value_and_grad(objective, has_aux=True)(master, piece)
            share = piece["counted"].sum() / tokens  # metrics are token means: weigh each piece by its tokens
            metrics = {name: metrics[name] + share * piece_metrics[name] for name in metrics}
            return (jax.tree.map(jnp.add, grads, piece_grads), loss + piece_loss, metrics), None

        extra = {"advantages": advantages, "weights": weights}
        extra.update({"old": old} if old is not None else {})
        extra.update({"ref": ref} if ref is not None else {})
        names = ("clip_low", "clip_high", "clip_fraction") + (("kl",) if settings.beta > 0 else ())
        start = (jax.tree.map(jnp.zeros_like, master), jnp.zeros((), jnp.float32), dict.fromkeys(names, 0.0))
        (grads, loss, metrics), _ = jax.lax.scan(accumulate, start, pieces({**batch, **extra}))
        updates, opt_state = transform.update(grads, opt_state, master)
        master = optax.apply_updates(master, updates)
        return master, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads),
                                   "param_norm": optax.tree.norm(master), **metrics}

    return PolicySteps(jax.jit(logprobs), jax.jit(update, donate_argnums=(0, 1)))


# ---- the training loop -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    steps: int  # steps completed
    rewards: list  # mean reward of each step this process ran
    evals: dict  # step -> {"TASK/EFFORT": accuracy}
    model: object  # the trained GptOss (adapters attached, for LoRA)
    exports: dict  # what was written: "adapter", "merged"
    export_loss: list = dataclasses.field(default_factory=list)  # what the MXFP4 export lost, per eval task/effort

    def summary(self) -> str:
        if not self.rewards:
            return "; ".join([scaffold.already_completed(self.steps, self.exports), *self.export_loss])
        head, tail = self.rewards[:10], self.rewards[-10:]
        text = (f"trained {self.steps} GRPO steps: mean reward {sum(head) / len(head):.3f} (first {len(head)} steps) "
                f"-> {sum(tail) / len(tail):.3f} (last {len(tail)})")
        for step, accuracies in list(self.evals.items())[-1:]:
            text += f"; eval at step {step}: " + ", ".join(f"{name} {value:.3f}" for name, value in accuracies.items())
        return "; ".join([text, *self.export_loss])


@dataclasses.dataclass
class Rollout:
    """One step's completions (prompt by prompt, `group_size` each) and their scores."""

    prompts: list[list[int]]  # the prompt of each completion
    completions: list[list[int]]
    samples: list  # rewards.Sample of each completion
    rewards: np.ndarray  # [N] weighted total (after the overlong penalty)
    values: dict[str, np.ndarray]  # reward name -> [N]
    errors: list[str]  # reports of rewards that raised
    seconds: float  # generation time


def train(config: ml_collections.ConfigDict, *, progress: bool = True) -> Result:
    """`gptoss-jax train` with method = "grpo": see the module's docstring and config.grpo's settings."""
    g = config.grpo
    named_rewards = [(name, rewards_lib.resolve(name, f"config.grpo.rewards[{index}]"), float(weight))
                     for index, (name, weight) in enumerate(zip(g.rewards, g.reward_weights, strict=True))]
    problems = load_problems(config)
    micro_batches = config.optimizer.grad_accum
    if (g.prompts_per_step * g.group_size) % micro_batches:
        raise ConfigError(f"config.optimizer.grad_accum: {micro_batches} micro-batches do not split a step's "
                          f"{g.prompts_per_step} x {g.group_size} completions evenly")
    settings = loss_settings(config)
    with scaffold.Run(config, progress=progress) as run:
        mesh = scaffold.make_mesh(config)
        generator = Generator(scaffold.build_model(config, mesh))
        graphdef, master, frozen, dtypes = scaffold.split_trainable(config, generator.model)
        reference = None  # the parameters the KL is measured to: LoRA off (adapters zeroed), or the start
        if g.beta > 0:
            reference = jax.tree.map(jnp.zeros_like if config.lora.enabled else jnp.copy, master)
        transform, schedule = scaffold.make_optimizer(config, master, updates_per_step=g.inner_steps)
        opt_state = scaffold.init_optimizer(transform, master, mesh)
        steps = make_policy_steps(graphdef, dtypes, transform, settings, remat=config.model.remat,
                                  micro_batches=micro_batches)
        start, state = run.resume({"params": master, "opt_state": opt_state})
        master, opt_state = state["params"], state["opt_state"]
        rows = NamedSharding(mesh, sharding.batch_spec(g.prompts_per_step * g.group_size, mesh))
        log.info("GRPO on %d problems of %s; %d x %d completions per step", len(problems), g.task,
                 g.prompts_per_step, g.group_size)
        mean_rewards, evals, step = [], {}, start
        while step < config.train.steps:
            chosen = step_prompts(problems, step, config)
            generator.state = nnx.state(scaffold.merge_trained(graphdef, master, dtypes, frozen))
            rollout = roll_out(generator, chosen, step, config, named_rewards)
            for report in rollout.errors:
                log.warning("step %d: %s", step + 1, report)
            started = time.perf_counter()
            batch, advantages, kept = update_batch(rollout, config)
            metrics = {}
            if kept.any():
                batch = {name: sharding.put(value, rows) for name, value in batch.items()}
                advantages = sharding.put(np.asarray(advantages), rows)
                old = steps.logprobs(master, frozen, batch) if g.inner_steps > 1 else None
                ref = steps.logprobs(reference, frozen, batch) if reference is not None else None
                for _ in range(g.inner_steps):
                    master, opt_state, metrics = steps.update(master, opt_state, frozen, batch, old, ref,
                                                              advantages)
                metrics = {name: float(value) for name, value in metrics.items()}
                run.check_finite(step + 1, metrics, scaffold.FINITE_METRICS)
            step += 1
            metrics.update(rollout_metrics(rollout, chosen, config, kept),
                           update_seconds=time.perf_counter() - started, updated=float(kept.any()),
                           learning_rate=float(schedule(step * g.inner_steps - 1)))
            mean_rewards.append(metrics["reward"])
            if step % config.train.log_every == 0 or step == config.train.steps:
                run.log(step, metrics, reward=f"{metrics['reward']:.3f}", kl=f"{metrics.get('kl', 0.0):.4f}")
            if rollout.errors and run.leader:
                with open(run.output / "reward_errors.jsonl", "a") as errors:
                    errors.writelines(json.dumps({"step": step, "error": report}) + "\n" for report in rollout.errors)
            if g.eval_tasks and (step % config.train.eval_every == 0 or step == config.train.steps):
                generator.state = nnx.state(scaffold.merge_trained(graphdef, master, dtypes, frozen))
                evals[step] = evaluate(generator, config, f"step_{step}")
                run.log(step, {f"eval/{name}": value for name, value in evals[step].items()})
            if run.end_of_step(step, {"params": master, "opt_state": opt_state}):
                break

        trained = scaffold.merge_trained(graphdef, master, dtypes, frozen)
        # a run continued from its checkpoints to more steps replaces the exports of fewer
        exports = (scaffold.export(trained, config, missing_only=start == step, replace=start > 0)
                   if step == config.train.steps else {})
        exported = scaffold.reload_mxfp4_export(config, exports, mesh) if g.eval_tasks else None
        lost = []
        if exported is not None:
            if step not in evals:  # a rerun that only exported
                generator.state = nnx.state(trained)
                evals[step] = evaluate(generator, config, f"step_{step}")
            accuracies = evaluate(Generator(exported), config, "exported")
            lost = [scaffold.export_loss(f"{name} accuracy", evals[step][name], accuracy, qat=config.train.qat,
                                         higher_is_better=True) for name, accuracy in accuracies.items()]
            run.log(step, {f"eval_exported/{name}": accuracy for name, accuracy in accuracies.items()})
    return Result(step, mean_rewards, evals, trained, exports, lost)


def loss_settings(config: ml_collections.ConfigDict) -> LossSettings:
    """The loss a training config's grpo settings describe."""
    g = config.grpo
    return LossSettings(epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high, beta=g.beta,
                        normalisation=g.normalisation, max_completion_length=g.max_completion_tokens,
                        temperature=g.temperature)


def load_problems(config: ml_collections.ConfigDict) -> list:
    """The problems the run's prompts come from (an eval task's: prompt, answer, grader); synthetic: the counting
    set of data.synthetic's num_train and seed."""
    from gptoss_jax.eval import tasks

    g = config.grpo
    data = ml_collections.ConfigDict({"synthetic": {"count": config.data.synthetic.num_train,
                                                    "seed": config.data.synthetic.seed}})
    if g.task in tasks.BUILTIN and g.task != "synthetic":
        if not g.source:
            raise ConfigError(f"config.grpo.source: task {g.task!r} needs its data: a file, directory or hub id")
        data[g.task] = {"source": g.source, "split": g.split}
    try:
        problems = tasks.load_task(g.task, data, seed=config.data.seed)
    except tasks.TaskError as error:
        raise ConfigError(f"config.grpo.task: {error}") from None
    kept = [p for p in problems if max(len(prompt_tokens(p, e)) for e in set(g.efforts)) <= g.max_prompt_tokens]
    if not kept:
        raise ConfigError(f"config.grpo.max_prompt_tokens: every prompt of {g.task!r} is longer than "
                          f"{g.max_prompt_tokens} tokens")
    if len(kept) < len(problems):
        log.warning("%d of %d prompts are longer than grpo.max_prompt_tokens = %d tokens: left out",
                    len(problems) - len(kept), len(problems), g.max_prompt_tokens)
    return kept


def prompt_tokens(problem, effort: str) -> list[int]:
    """A problem's prompt as the policy reads it: the user message at a reasoning effort, in harmony."""
    return harmony.encode_chat({"messages": [{"role": "user", "content": problem.prompt}],
                                "reasoning_effort": effort})


def step_prompts(problems: list, step: int, config: ml_collections.ConfigDict) -> list[tuple[object, str]]:
    """(problem, effort) of each prompt of step `step`: the run's k-th prompt is problem k mod n of the shuffle of
    epoch k // n (seeded with data.seed + epoch), asked at effort k mod len(efforts). A function of the step only,
    so that a resumed run asks what the uninterrupted one would have."""
    g = config.grpo
    chosen = []
    for k in range(step * g.prompts_per_step, (step + 1) * g.prompts_per_step):
        epoch, index = divmod(k, len(problems))
        order = np.random.default_rng(config.data.seed + epoch).permutation(len(problems))
        chosen.append((problems[order[index]], g.efforts[k % len(g.efforts)]))
    return chosen


def roll_out(generator: Generator, chosen: list, step: int, config: ml_collections.ConfigDict,
             named_rewards: list) -> Rollout:
    """`group_size` completions of each chosen prompt from the generator's current parameters, each row sampled
    with a seed of (train.seed, step, row), then scored."""
    g = config.grpo
    prompts, efforts, examples = [], [], []
    for problem, effort in chosen:
        prompts += [prompt_tokens(problem, effort)] * g.group_size
        efforts += [effort] * g.group_size
        examples += [dataclasses.asdict(problem)] * g.group_size
    seeds = [seed_of(config.train.seed, "grpo", step, row) for row in range(len(prompts))]
    started = time.perf_counter()
    completions = generator.generate(prompts, g.max_completion_tokens, temperature=g.temperature, top_p=g.top_p,
                                     seed=seeds)
    seconds = time.perf_counter() - started
    samples = [rewards_lib.Sample.of(c, max_tokens=g.max_completion_tokens, effort=e)
               for c, e in zip(completions, efforts, strict=True)]
    scored = [rewards_lib.score(named_rewards, sample, example, on_error=g.reward_errors)
              for sample, example in zip(samples, examples, strict=True)]
    totals = np.asarray([total for total, _, _ in scored], np.float32)
    if g.overlong == "penalty":
        totals = np.where([s.truncated for s in samples], np.float32(g.overlong_reward), totals)
    values = {name: np.asarray([v[name] for _, v, _ in scored], np.float32) for name, _, _ in named_rewards}
    return Rollout(prompts, completions, samples, totals, values, [e for _, _, errors in scored for e in errors],
                   seconds)


def update_batch(rollout: Rollout, config: ml_collections.ConfigDict):
    """(batch, advantages, kept): the completions as the training forward reads them (`update_length`
    positions), their group-normalised advantages, and which completions the loss keeps (dynamic sampling leaves
    out groups of equal rewards; overlong = "mask" leaves out cut completions)."""
    g = config.grpo
    advantages = group_advantages(jnp.asarray(rollout.rewards), g.group_size, g.scale)
    kept = np.ones(len(rollout.completions), bool)
    if g.dynamic_sampling:
        kept &= np.repeat(np.asarray(informative_groups(jnp.asarray(rollout.rewards), g.group_size)), g.group_size)
    if g.overlong == "mask":
        kept &= ~np.asarray([s.truncated for s in rollout.samples])
    batch = completion_batch(rollout.prompts, rollout.completions,
                             update_length(max(map(len, rollout.prompts)), g.max_completion_tokens))
    batch["counted"] &= kept[:, None]
    return batch, advantages, kept


def update_length(longest_prompt: int, max_completion_tokens: int) -> int:
    """Positions of an update's rows: the longest prompt and the completion budget, rounded up to a multiple of
    16 (a run compiles its update once per length it meets: a few times, not once per step)."""
    return -(-(longest_prompt + max_completion_tokens) // 16) * 16


def rollout_metrics(rollout: Rollout, chosen: list, config: ml_collections.ConfigDict, kept: np.ndarray) -> dict:
    g = config.grpo
    lengths = np.asarray([len(c) for c in rollout.completions])
    efforts = np.repeat([effort for _, effort in chosen], g.group_size)
    metrics = {"reward": float(rollout.rewards.mean()), "reward_std": float(rollout.rewards.std()),
               "completion_tokens": float(lengths.mean()), "completion_tokens_max": int(lengths.max()),
               "truncated": float(np.mean([s.truncated for s in rollout.samples])),
               "well_formed": float(np.mean([s.well_formed for s in rollout.samples])),
               "kept_completions": float(kept.mean()), "reward_errors": len(rollout.errors),
               "rollout_seconds": rollout.seconds, "rollout_tokens_per_s": lengths.sum() / max(rollout.seconds, 1e-9)}
    for effort in dict.fromkeys(efforts):
        metrics[f"reward_by_effort/{effort}"] = float(rollout.rewards[efforts == effort].mean())
    for name, values in rollout.values.items():
        metrics[f"reward_by_name/{name}"] = float(values.mean())
    return metrics


def evaluate(generator: Generator, config: ml_collections.ConfigDict, name: str) -> dict[str, float]:
    """The eval harness on the generator's model (greedy, grpo.eval_* settings) into output_dir/eval/NAME (step_N
    for the policy at step N, "exported" for the MXFP4 export read back): {"TASK/EFFORT": accuracy}. The run's
    own task, when evaluated, reads the same source's "test" files; the synthetic set is the held-out one
    (data.synthetic.seed + 1)."""
    from gptoss_jax.eval import sweep
    from gptoss_jax.eval.backends import JaxBackend

    g, output = config.grpo, Path(config.train.output_dir)
    settings = sweep.defaults()
    settings.tasks, settings.efforts = tuple(g.eval_tasks), tuple(g.eval_efforts)
    settings.limit, settings.max_tokens = g.eval_limit, g.eval_max_tokens
    settings.batch_size = g.eval_limit or settings.batch_size  # a limit of 0 evaluates every problem
    settings.data.synthetic.seed = config.data.synthetic.seed + 1
    if g.task in settings.data and g.task != "synthetic" and g.source:
        settings.data[g.task].source, settings.data[g.task].split = g.source, "test"
    folder = output / "eval" / name
    settings.output_dir = str(folder if jax.process_index() == 0 else folder / f"process_{jax.process_index()}")
    settings.model.checkpoint = f"{output}: {name}"
    backend = JaxBackend(generator, max_tokens=g.eval_max_tokens, temperature=0.0, top_p=1.0)
    results = sweep.run(settings, progress=False, backend=backend).summary["results"]
    return {f"{row['task']}/{row['effort']}": row["accuracy"] for row in results}
