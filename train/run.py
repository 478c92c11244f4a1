"""What every training run has, whatever it optimises (supervised fine-tuning in `trainer`, GRPO in `grpo`): the
mesh and the model (with adapters) from a config, trainable and frozen parameters, the optimizer and its state,
the output folder with its metrics, orbax checkpoints and resume, the NaN guard, SIGTERM, and the exports (PEFT
adapter, merged HF checkpoint). Both loops are built on it; it knows neither.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import secrets
import shutil
import signal
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from gptoss_jax import GptOss, GptOssConfig, harmony, load_model, lora, save_pretrained, sharding, tokenizer
from gptoss_jax.model import LoRAParam
from gptoss_jax.settings import ConfigError
from gptoss_jax.train.tensorboard import SummaryWriter

log = logging.getLogger(__name__)


FINITE_METRICS = ("loss", "grad_norm", "param_norm")  # a step with any of these not finite stops the run


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (non-finite loss); the message says why and where the last good state is."""


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
                           **run_time_choices(config))
    else:
        preset = getattr(GptOssConfig, config.model.preset)().replace(**run_time_choices(config))
        packed = config.lora.enabled and config.model.mxfp4 == "packed"
        model = GptOss(preset, dtype=dtype, mxfp4_experts=packed, rngs=nnx.Rngs(config.train.seed))
    if config.lora.enabled:
        lora.add_lora(model, lora_config(config), rngs=nnx.Rngs(config.train.seed + 1))
    return sharding.shard_model(model, mesh)


def run_time_choices(config: ml_collections.ConfigDict) -> dict:
    """The GptOssConfig fields a training config sets for its run (not part of the checkpoint)."""
    return dict(kernels=config.model.kernels, moe_tile=config.model.moe_tile, qat=config.train.qat)


def lora_config(config: ml_collections.ConfigDict) -> lora.LoraConfig:
    return lora.LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
                           targets=tuple(config.lora.targets))


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


def already_completed(steps: int, exports: dict) -> str:
    """The summary of a rerun that found every step done: what it exported, where an export was missing."""
    done = f"the run had already completed its {steps} steps"
    return f"{done}; exported what was missing: {', '.join(exports)}" if exports else f"nothing to do: {done}"


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
            max_to_keep=config.train.keep_checkpoints, enable_async_checkpointing=config.train.async_checkpoints),
            item_handlers=ocp.StandardCheckpointHandler())  # named, so that a checkpoint's metadata can be read
        self.metrics_file = open(self.output / "metrics.jsonl", "a") if self.leader else None
        reports = config.train.report_to.split(",") if self.leader else []
        self.writer = SummaryWriter(self.output / "tensorboard") if "tensorboard" in reports else None
        self.wandb = _wandb_run(config, self.output) if "wandb" in reports else None
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
            self.metrics_file.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        signal.signal(signal.SIGTERM, self._previous_handler)

    def resume(self, state):
        """(first step to run, state): the latest checkpoint's state when there is one, else `state` from step 0.
        `state` is any tree of arrays; the restored one has its shapes, dtypes and shardings."""
        start = self.manager.latest_step() or 0
        if start:
            # compared before restoring: a restore that fails part-way leaves orbax's reads of the other arrays
            # running, to end on its closed event loop; and a dtype that differs would be cast without a word
            difference = _difference(self.manager.metadata(start).item_metadata, state)
            if difference:
                raise ConfigError(
                    f"{self.checkpoints / str(start)}: the checkpoint does not fit this config's training state "
                    f"({difference}: lora.rank, lora.targets, lora.enabled, model.* or optimizer.* changed since it "
                    "was saved?); resume with the settings of config.json there, or choose another "
                    "train.output_dir")
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
            state = self.manager.restore(start, args=ocp.args.StandardRestore(abstract))
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
        if self.writer is not None:
            self.writer.scalars(step, values)
        if self.wandb is not None:  # a resumed run's replayed steps W&B has already: it keeps its first values
            self.wandb.log(values, step=step)

    def end_of_step(self, step: int, state) -> bool:
        """After step `step` (counted from 1): checkpoints when it is due, or at the end, or on SIGTERM; whether
        to stop now (SIGTERM)."""
        self.bar.update(1)
        if step % self.config.train.checkpoint_every == 0 or step == self.config.train.steps or self.stop_signal:
            self.manager.save(step, args=ocp.args.StandardSave(state))
        if self.stop_signal:
            log.warning("SIGTERM: saved step %d to %s; exiting", step, self.checkpoints)
        return bool(self.stop_signal)


def _difference(saved, state) -> str | None:
    """The first array, by dotted name, where a checkpoint's metadata (orbax's tree of it) and a state differ:
    missing on one side, or another shape or dtype. None where they match."""
    def arrays(tree) -> dict[str, tuple]:
        return {".".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path):
                (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def described(array: tuple | None) -> str:
        return "absent" if array is None else f"{array[1]}{list(array[0])}"

    saved, ours = arrays(saved), arrays(state)
    name = next((name for name in sorted(saved.keys() | ours.keys()) if saved.get(name) != ours.get(name)), None)
    return None if name is None else f"{name}: saved {described(saved.get(name))}, now {described(ours.get(name))}"


def _wandb_run(config: ml_collections.ConfigDict, output: Path):
    """A Weights & Biases run for the output folder, as TRL's report_to="wandb" makes one: named after the folder,
    the config as its config, the same W&B run again when the run resumes (its id kept in output/wandb_run_id);
    project, entity and mode from W&B's environment (WANDB_PROJECT, default gptoss-jax; WANDB_MODE=offline)."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("config.train.report_to: wandb needs the wandb package (pip install wandb)") from None
    id_file = output / "wandb_run_id"
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(8) + "\n")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "gptoss-jax"), name=output.absolute().name,
                      id=id_file.read_text().strip(), resume="allow", dir=str(output), config=config.to_dict())


def export(model: GptOss, config: ml_collections.ConfigDict, *, missing_only: bool = False,
           replace: bool = False) -> dict:
    """The adapter (PEFT format) and/or the merged HF checkpoint, as the config asks, each written to a hidden
    folder beside its place and renamed into it when complete (a run killed while exporting leaves no half
    export). `missing_only`: only those not written yet (the rerun of a run that completed its steps but not its
    exports). `replace`: an export already there is this run's, from fewer steps (a run continued to more
    `train.steps`): the new one takes its place once written. Otherwise an export already there is an error (another
    run's). Under jax.distributed every process gathers what is exported (a collective) and the first one writes
    it."""
    output, written = Path(config.train.output_dir), {}
    writers = {}
    if config.lora.enabled and config.export.adapter:
        writers["adapter"] = functools.partial(lora.save_peft_adapter, model,
                                               base_model_name_or_path=config.model.checkpoint or None)
    if config.export.merged:
        def write_merged(target: Path) -> None:  # weights and config, and the tokenizer files tools load beside them
            save_pretrained(lora.merge_lora(model) if config.lora.enabled else model, target, mxfp4=config.export.mxfp4)
            tokenizer.save_hf_tokenizer(target, model.config.max_position_embeddings, harmony.chat_template())

        writers["merged"] = write_merged
    if missing_only:  # as the first process, which writes them, sees them
        writers = {kind: write for kind, write in writers.items()
                   if not multihost_utils.broadcast_one_to_all(np.bool_((output / kind).exists()))}
    if writers and jax.process_count() > 1:
        exported = nnx.state(model) if config.export.merged else nnx.state(model, LoRAParam)
        nnx.update(model, sharding.on_every_host(exported))
    if jax.process_index() != 0:
        return written
    for kind in writers:
        if (output / kind).exists() and not replace:
            raise FileExistsError(f"{output / kind}: already exists; remove it or choose another train.output_dir")
    for kind, write in writers.items():
        partial, replaced = output / f".{kind}.partial", output / f".{kind}.replaced"
        for stale in (partial, replaced):  # a killed run's
            shutil.rmtree(stale, ignore_errors=True)
        write(partial)
        old = (output / kind).exists()
        if old:  # moved aside, then dropped (killed in between: the rerun writes the missing export again)
            (output / kind).rename(replaced)
        partial.rename(output / kind)
        shutil.rmtree(replaced, ignore_errors=True)
        written[kind] = output / kind
        log.info("exported %s to %s%s", kind, output / kind, " (replacing the export of fewer steps)" if old else "")
    if written and config.export.push_to_hub:
        push_to_hub(written, config.export.push_to_hub, private=config.export.hub_private,
                    message=f"gptoss-jax {config.method} export at step {config.train.steps}")
    return written


def push_to_hub(written: dict[str, Path], repo_id: str, *, private: bool, message: str) -> None:
    """Uploads the exports to the hub repo `repo_id` (created if missing; `private` then), as transformers' and
    PEFT's `push_to_hub` lay them out: the merged checkpoint at the root (`from_pretrained(repo_id)`), the adapter
    at the root when it is the only export, else under adapter/ (`PeftModel.from_pretrained(model, repo_id,
    subfolder="adapter")`). The token is huggingface_hub's own (HF_TOKEN, or `hf auth login`). A failed push
    leaves the exports where they are written, and says how to push them."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        for kind, folder in sorted(written.items(), key=lambda item: item[0] != "merged"):  # the root first
            below = kind if "merged" in written and kind != "merged" else ""
            api.upload_folder(repo_id=repo_id, folder_path=folder, path_in_repo=below,
                              commit_message=f"{message}: {kind}")
            log.info("pushed %s to %s/%s", kind, repo_id, below)
    except Exception as error:  # the hub's HTTP errors, and its HTTP client's connection errors (not OSErrors)
        raise OSError(f"export.push_to_hub: pushing to {repo_id} failed ({type(error).__name__}: {error}); the "
                      f"exports are written in {', '.join(map(str, written.values()))}: push them with `hf upload "
                      f"{repo_id} FOLDER`") from error


# What an MXFP4 export may lose against the model as trained before a run without QAT says so: 1% of the held-out
# loss, or 1 point of an eval task's accuracy.
EXPORT_LOSS_LIMIT = 0.01


def reload_mxfp4_export(config: ml_collections.ConfigDict, written: dict, mesh: jax.sharding.Mesh) -> GptOss | None:
    """The merged MXFP4 export just written, loaded as its users load it, to measure what it lost against the model
    as trained (callers load it only when they have something to measure it on); None when this call wrote none.
    Multi-process runs are not measured: the other processes may not see the files the first one wrote."""
    if "merged" not in written or not config.export.mxfp4 or jax.process_count() > 1:
        return None
    return load_model(written["merged"], dtype=config.model.compute_dtype, mesh=mesh, kernels=config.model.kernels)


def export_loss(name: str, trained: float, exported: float, *, qat: bool, higher_is_better: bool = False) -> str:
    """One line on what the MXFP4 export lost in `name` against the model as trained (a held-out loss, relative;
    an accuracy, in points), with a warning when it is past EXPORT_LOSS_LIMIT and the run did not train for it."""
    change = exported - trained
    if higher_is_better:
        lost, shown = -change, f"{100 * change:+.1f} points"
    else:
        lost = change / max(abs(trained), 1e-12)
        shown = f"{100 * lost:+.2f}%"
    line = f"MXFP4 export: {name} {exported:.4f} (as trained {trained:.4f}, {shown})"
    if lost > EXPORT_LOSS_LIMIT and not qat:
        line += (f" — the export lost more than {EXPORT_LOSS_LIMIT:.0%} to rounding what was learned; "
                 "train.qat = true trains for the MXFP4 export")
        log.warning(line)
    else:
        log.info(line)
    return line


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step")
