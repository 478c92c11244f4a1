"""The fine-tuning loop: one jitted train step (compiled once) and the hooks around it — data, logging,
evaluation, orbax checkpoints, the NaN guard, SIGTERM, export.

LoRA trains the `LoRAParam`s and leaves the base (which may be MXFP4-packed) frozen; full fine-tuning trains every
parameter. Trainable parameters are kept in `model.param_dtype` (float32 master weights) and cast to the model's
dtypes (`model.compute_dtype`; norms and sinks stay float32) for each forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from gptoss_jax import GptOss, GptOssConfig, load_model, lora, save_pretrained, sharding
from gptoss_jax.model import LoRAParam
from gptoss_jax.train import data as data_lib
from gptoss_jax.train import synthetic
from gptoss_jax.train.config import ConfigError
from gptoss_jax.train.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

LOSS_CHUNK_BYTES = 2**27  # a chunk of the loss holds at most this much of float32 logits (128 MiB: 160 tokens of 201k)


FINITE_METRICS = ("loss", "grad_norm", "param_norm")  # a step with any of these not finite stops the run


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (non-finite loss); the message says why and where the last good state is."""


# ---- model, data and optimizer from a config -------------------------------------------------------------------


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp, expert, tensor) mesh of `config.mesh` over `devices` (default: all); -1 takes the devices
    left."""
    try:
        return sharding.make_mesh({axis: config.mesh[axis] for axis in sharding.MESH_AXES}, devices)
    except ValueError as error:
        raise ValueError(f"config.{error}") from None


def build_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> GptOss:
    """The base model (a checkpoint, or a preset with random weights) with adapters when LoRA is on, placed on
    the mesh."""
    dtype = config.model.compute_dtype
    if config.model.checkpoint:
        model = load_model(config.model.checkpoint, dtype=dtype, mxfp4=config.model.mxfp4, mesh=mesh,
                           kernels=config.model.kernels, moe_tile=config.model.moe_tile)
    else:
        preset = getattr(GptOssConfig, config.model.preset)().replace(kernels=config.model.kernels,
                                                                        moe_tile=config.model.moe_tile)
        packed = config.lora.enabled and config.model.mxfp4 == "packed"
        model = GptOss(preset, dtype=dtype, mxfp4_experts=packed, rngs=nnx.Rngs(config.train.seed))
    if config.lora.enabled:
        lora.add_lora(model, lora_config(config), rngs=nnx.Rngs(config.train.seed + 1))
    return sharding.shard_model(model, mesh)


def lora_config(config: ml_collections.ConfigDict) -> lora.LoraConfig:
    return lora.LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
                           targets=tuple(config.lora.targets))


def load_examples(config: ml_collections.ConfigDict, source: str, *, split: str, stats: data_lib.DataStats):
    """Rendered examples of a JSONL path, dataset directory or hub id; "synthetic" writes the counting set
    (train and eval halves) under output_dir first."""
    if source == "synthetic":
        spec = config.data.synthetic
        count = spec.num_train if split == "train" else spec.num_eval
        records = synthetic.counting_records(count, seed=spec.seed + (split != "train"))
        source = Path(config.train.output_dir) / f"synthetic_{split}.jsonl"
        if jax.process_index() == 0:
            synthetic.write_jsonl(records, source)
        multihost_utils.sync_global_devices(f"{source} written")  # the processes may share output_dir
    rows = data_lib.read_records(source, split=split)
    return data_lib.encode_examples(rows, train_on=config.data.train_on, skip_invalid=config.data.skip_invalid,
                                    stats=stats)


class Batches:
    """The rows of step `s`: epoch `e` is the examples packed after a shuffle by `seed + e`, and steps take
    consecutive rows, so a resumed run sees exactly the rows it would have. Each shuffle packs a few rows more or
    fewer, so each epoch has its own number of whole steps; the rows left after its last step are not used."""

    def __init__(self, examples, config: ml_collections.ConfigDict, read_stats: data_lib.DataStats):
        self.examples, self.config, self.read_stats = examples, config, read_stats
        self.rows_per_step = rows_per_process(config) * config.optimizer.grad_accum  # this process's share
        self._epoch, self._rows = None, None
        self._steps: list[int] = []  # whole steps of epochs 0, 1, ..., as far as packed
        self.stats = read_stats
        self.steps_in_epoch(0)

    def _epoch_rows(self, epoch: int) -> data_lib.PackedRows:
        if epoch != self._epoch:
            self.stats = dataclasses.replace(self.read_stats)
            self._rows = data_lib.pack(self.examples, self.config.data.seq_len, overlong=self.config.data.overlong,
                                       seed=self.config.data.seed + epoch, shuffle=self.config.data.shuffle,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count(), stats=self.stats)
            self._epoch = epoch
        return self._rows

    def steps_in_epoch(self, epoch: int) -> int:
        while len(self._steps) <= epoch:
            rows = len(self._epoch_rows(len(self._steps)))
            if rows < self.rows_per_step:
                raise ValueError(f"config.data: one step takes {self.rows_per_step} rows of {self.config.data.seq_len}"
                                 f" tokens; the training data fills only {rows} (epoch {len(self._steps)})")
            self._steps.append(rows // self.rows_per_step)
        return self._steps[epoch]

    def batch(self, step: int) -> data_lib.PackedRows:
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        rows = self._epoch_rows(epoch)
        take = slice(step * self.rows_per_step, (step + 1) * self.rows_per_step)
        return data_lib.PackedRows(*(getattr(rows, f.name)[take] for f in dataclasses.fields(rows)))


def rows_per_process(config: ml_collections.ConfigDict) -> int:
    """This process's share of a (micro-)batch: `data.batch_size` rows are the global batch, split evenly over the
    processes of a jax.distributed run."""
    if config.data.batch_size % jax.process_count():
        raise ValueError(f"config.data.batch_size: {config.data.batch_size} rows do not split evenly over "
                         f"{jax.process_count()} processes")
    return config.data.batch_size // jax.process_count()


def make_optimizer(config: ml_collections.ConfigDict, params: nnx.State, *, updates_per_step: int = 1):
    """(AdamW with global-norm clipping, its schedule: warmup then cosine decay to `min_lr_ratio`); weight decay on
    matrices only (not biases, norm scales, sinks). The schedule counts optimizer updates: `updates_per_step` per
    training step (GRPO's inner steps)."""
    opt = config.optimizer
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps * updates_per_step,
        decay_steps=config.train.steps * updates_per_step, end_value=opt.learning_rate * opt.min_lr_ratio)
    decayed = jax.tree.map(lambda v: v.replace(value=sum(a != "layers" for a in v.axes) >= 2), params,
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
    transform = optax.chain(
        optax.clip_by_global_norm(opt.clip_norm),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=decayed),
    )
    return transform, schedule


# ---- the loss and the step -------------------------------------------------------------------------------------


def token_losses(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Sum over tokens of weight * cross-entropy, in float32 (see `token_logprobs`)."""
    return -jnp.sum(weights.reshape(-1) * token_logprobs(hidden, unembedding, targets, weights != 0).reshape(-1))


def token_logprobs(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array, counted: jax.Array) -> jax.Array:
    """log p(target) of every token [..., T] (0 where not `counted`), computing the logits a chunk of tokens at a
    time (the full [tokens, vocab] logits of a long batch would not fit), in float32.

    The counted tokens are moved to the front first and chunks of only uncounted ones (the prompts, the padding)
    are skipped, forward and backward: with a 201k vocabulary the unembedding is a large part of a step, and most
    tokens of a fine-tuning batch are prompt."""
    shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets, counted = targets.reshape(-1), counted.reshape(-1)
    order = jnp.argsort(~counted, stable=True)
    hidden, targets, counted = hidden[order], targets[order], counted[order]
    largest = 1 << max(6, (LOSS_CHUNK_BYTES // (4 * unembedding.shape[0])).bit_length() - 1)  # a power of two
    chunk = min(largest, max(64, len(targets) // 8))
    pad = -len(targets) % chunk

    def chunked(a):
        return jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(-1, chunk, *a.shape[1:])

    logprobs = _chunked_logprobs(chunked(hidden), chunked(targets), chunked(counted), unembedding)
    return jnp.zeros(len(targets), jnp.float32).at[order].set(logprobs.reshape(-1)[:len(targets)]).reshape(shape)


def _chunk_logits(hidden, unembedding):
    return jnp.einsum("nd,vd->nv", hidden, unembedding, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _chunked_logprobs(hidden, targets, counted, unembedding):
    """logits[target] - logsumexp(logits) of chunks [C, n, ...] of tokens (0 in chunks with nothing counted). A
    custom VJP keeps only each token's log-partition for the backward, which recomputes a chunk's logits once for
    both gradients (nothing of size [tokens, vocab], and no per-chunk copy of the unembedding, is ever stored)."""
    return _logprobs_forward(hidden, targets, counted, unembedding)[0]


def _logprobs_forward(hidden, targets, counted, unembedding):
    def chunk_logprobs(chunk):
        h, t, c = chunk

        def compute(_):
            logits = _chunk_logits(h, unembedding)
            partition = jax.nn.logsumexp(logits, axis=-1)
            return jnp.where(c, jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0] - partition, 0.0), partition

        skipped = (jnp.zeros(t.shape, jnp.float32), jnp.zeros(t.shape, jnp.float32))
        return jax.lax.cond(jnp.any(c), compute, lambda _: skipped, None)

    return jax.lax.map(chunk_logprobs, (hidden, targets, counted))


def _logprobs_fwd(hidden, targets, counted, unembedding):
    # symbolic_zeros: arguments come as (value, perturbed); a frozen unembedding (LoRA) gets no gradient buffer.
    # Whether it trains travels in the residuals' structure: a marker array, or None.
    trains = jnp.zeros(()) if unembedding.perturbed else None
    hidden, targets, counted, unembedding = (p.value for p in (hidden, targets, counted, unembedding))
    logprobs, partitions = _logprobs_forward(hidden, targets, counted, unembedding)
    return logprobs, (hidden, targets, counted, unembedding, partitions, trains)


def _logprobs_bwd(residuals, grad):
    """Per chunk: d logits = grad * (one-hot target - softmax) on counted tokens; d hidden = d logits @ U; d U
    (only when the unembedding trains) accumulates d logits^T @ hidden."""
    hidden, targets, counted, unembedding, partitions, trains = residuals
    train_unembedding = trains is not None

    def chunk_grads(d_unembedding, chunk):
        h, t, c, partition, g = chunk

        def compute(d_unembedding):
            probs = jnp.exp(_chunk_logits(h, unembedding) - partition[:, None])
            d_logits = jnp.where(c, g, 0.0)[:, None] * (-probs).at[jnp.arange(len(t)), t].add(1.0)
            d_hidden = jnp.dot(d_logits.astype(h.dtype), unembedding, preferred_element_type=jnp.float32)
            if train_unembedding:
                d_unembedding += jnp.einsum("nv,nd->vd", d_logits.astype(h.dtype), h,
                                            preferred_element_type=jnp.float32)
            return d_unembedding, d_hidden.astype(h.dtype)

        return jax.lax.cond(jnp.any(c), compute, lambda d: (d, jnp.zeros_like(h)), d_unembedding)

    start = jnp.zeros(unembedding.shape, jnp.float32) if train_unembedding else None
    d_unembedding, d_hidden = jax.lax.scan(chunk_grads, start, (hidden, targets, counted, partitions, grad))
    return (d_hidden, None, None,
            d_unembedding.astype(unembedding.dtype) if train_unembedding else None)


_chunked_logprobs.defvjp(_logprobs_fwd, _logprobs_bwd, symbolic_zeros=True)


@dataclasses.dataclass
class Step:
    """The compiled train and eval steps of one run, and how many times the train step was traced."""

    train: callable
    evaluate: callable
    gradients: callable  # what `train` applies: (master, frozen, batch, step) -> (gradients, loss, router losses)
    traces: list


def make_steps(config: ml_collections.ConfigDict, graphdef, dtypes, transform, schedule) -> Step:
    remat, accum = config.model.remat, config.optimizer.grad_accum
    use_dropout = config.lora.enabled and config.lora.dropout > 0
    weights = (config.loss.z_loss_weight, config.loss.aux_loss_weight)
    base_key = jax.random.key(config.train.seed)
    traces = []

    def forward(master, frozen, batch, key):
        params = jax.tree.map(lambda p, d: p.astype(d), master, dtypes)
        model = nnx.merge(graphdef, params, frozen)
        hidden, router = model.hidden_states(batch["inputs"], positions=batch["positions"],
                                             segment_ids=batch["segment_ids"],
                                             dropout_key=key if use_dropout else None, remat=remat)
        summed = token_losses(hidden, model.unembedding[...], batch["targets"], batch["weights"])
        return summed, router

    def gradients(master, frozen, batch, step):
        """(gradients, mean token loss, router losses) of the whole batch: the objective is the mean loss over all
        its counted tokens plus the weighted router losses averaged over the `grad_accum` micro-batches, whose
        gradients are summed."""
        count = jnp.maximum(batch["weights"].sum(), 1.0)
        micro = jax.tree.map(lambda a: a.reshape(accum, -1, *a.shape[1:]), batch)
        key = jax.random.fold_in(base_key, step)

        def objective(master, frozen, piece, key):
            summed, router = forward(master, frozen, piece, key)
            return summed / count + (weights[0] * router[0] + weights[1] * router[1]) / accum, (summed, router)

        def accumulate(carry, piece_and_index):
            grads, summed, router = carry
            piece, index = piece_and_index
            (_, (piece_sum, piece_router)), piece_grads = jax.value_and_grad(objective, has_aux=True)(
                master, frozen, piece, jax.random.fold_in(key, index))
            grads = jax.tree.map(jnp.add, grads, piece_grads)
            return (grads, summed + piece_sum, router + piece_router / accum), None

        zeros = jax.tree.map(jnp.zeros_like, master)
        (grads, summed, router), _ = jax.lax.scan(accumulate, (zeros, 0.0, jnp.zeros(2)), (micro, jnp.arange(accum)))
        return grads, summed / count, router

    def train_step(master, opt_state, frozen, batch, step):
        traces.append(step)  # runs only while tracing: counts compilations
        grads, loss, router = gradients(master, frozen, batch, step)
        updates, opt_state = transform.update(grads, opt_state, master)
        master = optax.apply_updates(master, updates)
        metrics = {"loss": loss, "router_z_loss": router[0], "load_balance": router[1],
                   "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(master),
                   "learning_rate": schedule(step),
                   "tokens": (batch["segment_ids"] > 0).sum(), "trained_tokens": batch["weights"].sum()}
        return master, opt_state, metrics

    def eval_step(master, frozen, batch):
        summed, _ = forward(master, frozen, batch, None)
        return summed, batch["weights"].sum()

    return Step(jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(eval_step), jax.jit(gradients), traces)


# ---- the loop ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    steps: int  # steps completed
    losses: list  # training loss of each step this process ran
    eval_losses: dict  # step -> held-out loss
    model: GptOss  # the trained model (adapters attached, for LoRA)
    compiles: int  # times the train step was traced
    exports: dict  # what was written: "adapter", "merged"

    def summary(self) -> str:
        if not self.losses:
            return already_completed(self.steps, self.exports)
        last = self.losses[-10:]
        return (f"trained {self.steps} steps: loss {self.losses[0]:.3f} -> {sum(last) / len(last):.3f} (mean of the "
                f"last {len(last)})" + "".join(f"; held-out loss at step {s}: {v:.3f}"
                                                 for s, v in list(self.eval_losses.items())[-1:]))


def already_completed(steps: int, exports: dict) -> str:
    """The summary of a rerun that found every step done: what it exported, where an export was missing."""
    done = f"the run had already completed its {steps} steps"
    return f"{done}; exported what was missing: {', '.join(exports)}" if exports else f"nothing to do: {done}"


def train(config: ml_collections.ConfigDict, *, progress: bool = True) -> Result:
    if config.method == "grpo":
        from gptoss_jax.train import grpo  # it builds on this module

        return grpo.train(config, progress=progress)
    with Run(config, progress=progress) as run:
        mesh = make_mesh(config)
        graphdef, master, frozen, dtypes = split_trainable(config, build_model(config, mesh))
        transform, schedule = make_optimizer(config, master)
        opt_state = init_optimizer(transform, master, mesh)
        steps = make_steps(config, graphdef, dtypes, transform, schedule)

        train_stats = data_lib.DataStats()
        batches = Batches(load_examples(config, config.data.train, split="train", stats=train_stats), config,
                          train_stats)
        eval_rows = None
        if config.data.eval:
            eval_stats = data_lib.DataStats()
            eval_examples = load_examples(config, config.data.eval, split="test", stats=eval_stats)
            eval_rows = data_lib.pack(eval_examples, config.data.seq_len, overlong=config.data.overlong,
                                      shuffle="none", process_index=jax.process_index(),
                                      process_count=jax.process_count())
        log.info("training data: %s", batches.stats.report())

        start, state = run.resume({"params": master, "opt_state": opt_state})
        master, opt_state = state["params"], state["opt_state"]
        batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        losses, eval_losses = [], {}
        step, started, tokens_since = start, time.perf_counter(), 0.0
        while step < config.train.steps:
            batch = _global_batch(batches.batch(step), batch_sharding)
            master, opt_state, metrics = steps.train(master, opt_state, frozen, batch, jnp.int32(step))
            metrics = {name: float(value) for name, value in metrics.items()}
            run.check_finite(step + 1, metrics, FINITE_METRICS)
            step += 1
            losses.append(metrics["loss"])
            tokens_since += metrics["tokens"]
            if step % config.train.log_every == 0 or step == config.train.steps:
                elapsed = time.perf_counter() - started
                metrics["tokens_per_s"] = tokens_since / max(elapsed, 1e-9)
                started, tokens_since = time.perf_counter(), 0.0
                run.log(step, metrics, loss=f"{metrics['loss']:.3f}", lr=f"{metrics['learning_rate']:.2e}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}")
            if eval_rows is not None and (step % config.train.eval_every == 0 or step == config.train.steps):
                eval_losses[step] = evaluate(steps, master, frozen, eval_rows, config, batch_sharding)
                run.log(step, {"eval_loss": eval_losses[step]})
            if run.end_of_step(step, {"params": master, "opt_state": opt_state}):
                break

    trained = merge_trained(graphdef, master, dtypes, frozen)
    exports = export(trained, config, missing_only=start == step) if step == config.train.steps else {}
    return Result(step, losses, eval_losses, trained, len(steps.traces), exports)


def split_trainable(config: ml_collections.ConfigDict, model: GptOss):
    """(graphdef, float32-or-configured master copy of what trains, the frozen rest, the trained parameters'
    model dtypes): LoRA trains the adapters, full fine-tuning every parameter."""
    trainable = LoRAParam if config.lora.enabled else nnx.Param
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    dtypes = jax.tree.map(lambda a: a.dtype, params)
    master = jax.tree.map(lambda a: a.astype(config.model.param_dtype), params)
    return graphdef, master, frozen, dtypes


def init_optimizer(transform, master, mesh: jax.sharding.Mesh):
    """The optimizer state, its counters and other scalars replicated on the mesh, as a step returns them (else
    the step would compile twice)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda a: a if isinstance(a.sharding, NamedSharding) else sharding.put(a, replicated),
                        transform.init(master))


def merge_trained(graphdef, master, dtypes, frozen) -> GptOss:
    """The model with the trained parameters, in the model's dtypes."""
    return nnx.merge(graphdef, jax.tree.map(lambda p, d: p.astype(d), master, dtypes), frozen)


class Run:
    """What every training loop has, whatever it optimises: the output folder (config.json, metrics.jsonl and
    TensorBoard written by the first process), orbax checkpoints of the training state (resume from the latest;
    every process writes its shards), the NaN guard, SIGTERM (checkpoint after the current step, then stop) and the
    progress bar. Use it as a context manager: leaving it waits for checkpoints in flight and closes the files."""

    def __init__(self, config: ml_collections.ConfigDict, *, progress: bool):
        self.config, self.progress = config, progress
        self.output = Path(config.train.output_dir)
        self.output.mkdir(parents=True, exist_ok=True)
        self.leader = jax.process_index() == 0
        if self.leader:
            (self.output / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        self.checkpoints = (self.output / "checkpoints").absolute()
        self.manager = ocp.CheckpointManager(self.checkpoints, options=ocp.CheckpointManagerOptions(
            max_to_keep=config.train.keep_checkpoints, enable_async_checkpointing=config.train.async_checkpoints))
        self.metrics_file = open(self.output / "metrics.jsonl", "a") if self.leader else None
        self.writer = SummaryWriter(self.output / "tensorboard") if self.leader else None
        self.bar = None
        self.stop_signal = None
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, number, frame):
        self.stop_signal = number

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        if self.bar is not None:
            self.bar.close()
        if self.leader:
            self.writer.close()
            self.metrics_file.close()
        signal.signal(signal.SIGTERM, self._previous_handler)

    def resume(self, state):
        """(first step to run, state): the latest checkpoint's state when there is one, else `state` from step 0.
        `state` is any tree of arrays; the restored one has its shapes, dtypes and shardings."""
        start = self.manager.latest_step() or 0
        if start:
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
            try:
                state = self.manager.restore(start, args=ocp.args.StandardRestore(abstract))
            except ValueError as error:  # orbax: a tree or shape that differs from the saved one
                raise ConfigError(
                    f"{self.checkpoints / str(start)}: the checkpoint does not fit this config's training state "
                    "(lora.rank, lora.targets, lora.enabled, model.* or optimizer.* changed since it was saved?); "
                    "resume with the settings of config.json there, or choose another train.output_dir. orbax: "
                    f"{str(error).splitlines()[0][:300]}") from error
            log.info("resumed from %s at step %d", self.checkpoints, start)
        if self.leader:  # the steps after `start` run again: their old lines go
            self.metrics_file.close()
            path = self.output / "metrics.jsonl"
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line)["step"] <= start]
            path.write_text("".join(kept))
            self.metrics_file = open(path, "a")
        self.bar = _progress(self.progress and self.leader, self.config.train.steps, start)
        return start, state

    def check_finite(self, step: int, metrics: dict, names: tuple[str, ...]) -> None:
        """Stops the run (TrainingStopped) when a metric of step `step` is not finite; that state is not saved."""
        bad = {name: metrics[name] for name in names if not math.isfinite(metrics[name])}
        if bad:
            self.manager.wait_until_finished()
            last = self.manager.latest_step()
            values = ", ".join(f"{name.replace('_', ' ')} {metrics[name]}" for name in names)
            raise TrainingStopped(
                f"step {step}: {values} — stopped without saving this state; the last good checkpoint is "
                + (f"step {last} in {self.checkpoints}" if last is not None else "none (no step saved)"))

    def log(self, step: int, values: dict, **shown) -> None:
        """Metrics of `step` to metrics.jsonl and TensorBoard; `shown` on the progress bar."""
        if shown:
            self.bar.set_postfix(**shown)
        if not self.leader:
            return
        self.metrics_file.write(json.dumps({"step": step, **values}) + "\n")
        self.metrics_file.flush()
        self.writer.scalars(step, values)

    def end_of_step(self, step: int, state) -> bool:
        """After step `step` (counted from 1): checkpoints when it is due, or at the end, or on SIGTERM; whether
        to stop now (SIGTERM)."""
        self.bar.update(1)
        if step % self.config.train.checkpoint_every == 0 or step == self.config.train.steps or self.stop_signal:
            self.manager.save(step, args=ocp.args.StandardSave(state))
        if self.stop_signal:
            log.warning("SIGTERM: saved step %d to %s; exiting", step, self.checkpoints)
        return bool(self.stop_signal)


def evaluate(steps: Step, master, frozen, rows: data_lib.PackedRows, config, sharding) -> float:
    """Mean token loss over the first `eval_batches` batches of the held-out rows (this process's share of each)."""
    size = rows_per_process(config)
    summed = count = 0.0
    for start in range(0, min(len(rows), size * config.train.eval_batches), size):
        piece = data_lib.PackedRows(*(getattr(rows, f.name)[start:start + size] for f in dataclasses.fields(rows)))
        if len(piece) < size:
            break
        batch_sum, batch_count = steps.evaluate(master, frozen, _global_batch(piece, sharding))
        summed, count = summed + float(batch_sum), count + float(batch_count)
    return summed / max(count, 1.0)


def export(model: GptOss, config: ml_collections.ConfigDict, *, missing_only: bool = False) -> dict:
    """The adapter (PEFT format) and/or the merged HF checkpoint, as the config asks, each written to a hidden
    folder beside its place and renamed into it when complete (a run killed while exporting leaves no half
    export). `missing_only`: only those not written yet (the rerun of a run that completed its steps but not its
    exports); otherwise an export already there is an error. Under jax.distributed every process gathers what is
    exported (a collective) and the first one writes it."""
    output, written = Path(config.train.output_dir), {}
    writers = {}
    if config.lora.enabled and config.export.adapter:
        writers["adapter"] = functools.partial(lora.save_peft_adapter, model,
                                               base_model_name_or_path=config.model.checkpoint or None)
    if config.export.merged:
        writers["merged"] = lambda target: save_pretrained(lora.merge_lora(model) if config.lora.enabled else model,
                                                           target, mxfp4=config.export.mxfp4)
    if missing_only:  # as the first process, which writes them, sees them
        writers = {kind: write for kind, write in writers.items()
                   if not multihost_utils.broadcast_one_to_all(np.bool_((output / kind).exists()))}
    if writers and jax.process_count() > 1:
        exported = nnx.state(model) if config.export.merged else nnx.state(model, LoRAParam)
        nnx.update(model, sharding.on_every_host(exported))
    if jax.process_index() != 0:
        return written
    for kind in writers:
        if (output / kind).exists():
            raise FileExistsError(f"{output / kind}: already exists; remove it or choose another train.output_dir")
    for kind, write in writers.items():
        partial = output / f".{kind}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # a killed run's
        write(partial)
        partial.rename(output / kind)
        written[kind] = output / kind
        log.info("exported %s to %s", kind, output / kind)
    return written


def _global_batch(rows: data_lib.PackedRows, sharding: NamedSharding) -> dict[str, jax.Array]:
    """This host's rows as its part of the global batch (every host packs its own share of the data)."""
    return {f.name: jax.make_array_from_process_local_data(sharding, getattr(rows, f.name))
            for f in dataclasses.fields(rows)}


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step")

