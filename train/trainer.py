"""The supervised fine-tuning loop: one jitted train step (compiled once) and the hooks around it — data, logging,
evaluation, and what every run has (`train.run`: checkpoints, the NaN guard, SIGTERM, export). GRPO is
`train.grpo`; the command line chooses between them by `config.method`.

LoRA trains the `LoRAParam`s and leaves the base (which may be MXFP4-packed) frozen; full fine-tuning trains every
parameter. Trainable parameters are kept in `model.param_dtype` (float32 master weights) and cast to the model's
dtypes (`model.compute_dtype`; norms and sinks stay float32) for each forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from gptoss_jax import GptOss, synthetic
from gptoss_jax.train import data as data_lib
from gptoss_jax.train.loss import token_losses
from gptoss_jax.train.run import (
    FINITE_METRICS,
    Run,
    already_completed,
    build_model,
    export,
    export_loss,
    init_optimizer,
    make_mesh,
    make_optimizer,
    merge_trained,
    reload_mxfp4_export,
    rows_per_process,
    split_trainable,
)

log = logging.getLogger(__name__)


# ---- data from a config ------------------------------------------------------------------------------------------


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


# ---- the loss and the step -------------------------------------------------------------------------------------


def summed_loss(model: GptOss, batch: dict, dropout_key=None, remat: str = "none"):
    """(summed token loss of the batch's counted tokens, router losses)."""
    hidden, router = model.hidden_states(batch["inputs"], positions=batch["positions"],
                                         segment_ids=batch["segment_ids"], dropout_key=dropout_key, remat=remat)
    return token_losses(hidden, model.unembedding[...], batch["targets"], batch["weights"]), router


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
        return summed_loss(nnx.merge(graphdef, params, frozen), batch, key if use_dropout else None, remat)

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
    export_loss: str = ""  # what the MXFP4 export lost in held-out loss (when one was written and measured)

    def summary(self) -> str:
        if not self.losses:
            return "; ".join(filter(None, [already_completed(self.steps, self.exports), self.export_loss]))
        last = self.losses[-10:]
        return (f"trained {self.steps} steps: loss {self.losses[0]:.3f} -> {sum(last) / len(last):.3f} (mean of the "
                f"last {len(last)})" + "".join(f"; held-out loss at step {s}: {v:.3f}"
                                                 for s, v in list(self.eval_losses.items())[-1:])
                + (f"; {self.export_loss}" if self.export_loss else ""))


def train(config: ml_collections.ConfigDict, *, progress: bool = True) -> Result:
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
                eval_losses[step] = evaluate(functools.partial(steps.evaluate, master, frozen), eval_rows, config,
                                             batch_sharding)
                run.log(step, {"eval_loss": eval_losses[step]})
            if run.end_of_step(step, {"params": master, "opt_state": opt_state}):
                break

        trained = merge_trained(graphdef, master, dtypes, frozen)
        # a run continued from its checkpoints to more steps replaces the exports of fewer
        exports = (export(trained, config, missing_only=start == step, replace=start > 0)
                   if step == config.train.steps else {})
        exported = reload_mxfp4_export(config, exports, mesh) if eval_rows is not None else None
        lost = ""
        if exported is not None:
            losses_of = {
                "trained": eval_losses.get(step) or evaluate(functools.partial(steps.evaluate, master, frozen),
                                                             eval_rows, config, batch_sharding),
                "exported": evaluate(_model_loss(exported), eval_rows, config, batch_sharding)}
            lost = export_loss("held-out loss", losses_of["trained"], losses_of["exported"], qat=config.train.qat)
            run.log(step, {"eval_loss_trained": losses_of["trained"], "eval_loss_exported": losses_of["exported"]})
    return Result(step, losses, eval_losses, trained, len(steps.traces), exports, lost)


def evaluate(batch_loss, rows: data_lib.PackedRows, config, sharding) -> float:
    """Mean token loss over the first `eval_batches` batches of the held-out rows (this process's share of each);
    `batch_loss(batch)` gives a batch's (summed loss, counted tokens)."""
    size = rows_per_process(config)
    summed = count = 0.0
    for start in range(0, min(len(rows), size * config.train.eval_batches), size):
        piece = data_lib.PackedRows(*(getattr(rows, f.name)[start:start + size] for f in dataclasses.fields(rows)))
        if len(piece) < size:
            break
        batch_sum, batch_count = batch_loss(_global_batch(piece, sharding))
        summed, count = summed + float(batch_sum), count + float(batch_count)
    return summed / max(count, 1.0)


def _model_loss(model: GptOss):
    """`evaluate`'s batch loss for a whole model (an export read back)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def batch_loss(state, batch):
        summed, _ = summed_loss(nnx.merge(graphdef, state), batch)
        return summed, batch["weights"].sum()

    return functools.partial(batch_loss, state)


def _global_batch(rows: data_lib.PackedRows, sharding: NamedSharding) -> dict[str, jax.Array]:
    """This host's rows as its part of the global batch (every host packs its own share of the data)."""
    return {f.name: jax.make_array_from_process_local_data(sharding, getattr(rows, f.name))
            for f in dataclasses.fields(rows)}


