"""Fine-tuning: LoRA on a packed MXFP4 base and full fine-tuning on tiny models, checkpoints and resumption,
the NaN guard and SIGTERM, PEFT and HF exports checked against transformers + PEFT, configs and plan."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from peft import PeftModel
from safetensors.numpy import load_file

import gptoss_jax
from gptoss_jax import lora
from gptoss_jax.model import LoRAParam
from gptoss_jax.train.config import ConfigError, load_config
from gptoss_jax.train.data import DataStats
from gptoss_jax.train.run import TrainingStopped
from gptoss_jax.train.trainer import Batches, load_examples, train

from helpers import free_ports, hub_stand_in, killed_run_resumes_bit_identically, relative_error, wandb_offline_history
from layouts import model_with_mxfp4_experts, write_hf_mxfp4

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "train" / "tiny_demo.py"
SMALL = dict(num_hidden_layers=2, vocab_size=201088, num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def mxfp4_base(tmp_path_factory):
    """A tiny HF-MXFP4 checkpoint with the real vocabulary (harmony tokens), and its dense twin."""
    root = tmp_path_factory.mktemp("base")
    model, packed = model_with_mxfp4_experts(seed=11, **SMALL)
    write_hf_mxfp4(model, packed, root / "mxfp4")
    model.save_pretrained(root / "dense")
    return root


def _config(output: Path, base: Path | None, **overrides):
    settings = {"data.seq_len": 160, "data.batch_size": 2, "data.synthetic.num_train": 60, "data.synthetic.num_eval": 8,
                "train.steps": 6, "train.log_every": 1, "train.eval_every": 3, "train.eval_batches": 1,
                "train.checkpoint_every": 2, "optimizer.warmup_steps": 1, "train.output_dir": str(output)}
    if base is not None:
        settings["model.checkpoint"] = str(base)
    settings.update(overrides)
    return load_config(DEMO, [f"--config.{key}={value}" for key, value in settings.items()])


LORA = {"lora.enabled": True, "model.mxfp4": "packed", "lora.targets": "*", "optimizer.learning_rate": 2e-2,
        "optimizer.weight_decay": 0.0, "export.mxfp4": True}


@pytest.fixture(scope="module")
def lora_run(mxfp4_base, tmp_path_factory):
    output = tmp_path_factory.mktemp("lora")
    return train(_config(output, mxfp4_base / "mxfp4", **LORA), progress=False), output


def test_lora_trains_the_adapters_and_leaves_the_packed_base_untouched(lora_run, mxfp4_base):
    result, output = lora_run
    assert result.steps == 6 and result.compiles == 1
    assert np.mean(result.losses[-2:]) < result.losses[0]
    base = gptoss_jax.load_model(mxfp4_base / "mxfp4", dtype="float32")
    trained_base = nnx.state(result.model, nnx.Not(LoRAParam))
    for (path, trained), (_, original) in zip(nnx.to_flat_state(trained_base), nnx.to_flat_state(nnx.state(base)),
                                              strict=True):
        for a, b in zip(jax.tree.leaves(trained.get_value()), jax.tree.leaves(original.get_value()), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    experts = result.model.banded_blocks.mlp.w_gate_up.get_value()
    assert experts.blocks.dtype == np.uint8  # still packed
    assert float(np.abs(result.model.banded_blocks.mlp.adapters["w_gate_up"].b[...]).max()) > 0
    assert float(np.abs(result.model.full_blocks.attn.adapters["wq"].b[...]).max()) > 0
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3, 4, 5, 6]
    assert [line["step"] for line in lines if "eval_loss" in line] == [3, 6]


def test_tensorboard_reads_the_event_file(lora_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, output = lora_run
    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [1, 2, 3, 4, 5, 6]
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    metrics = [line for line in lines if "loss" in line]
    np.testing.assert_allclose([e.value for e in losses], [m["loss"] for m in metrics], rtol=1e-6)
    assert [e.step for e in events.Scalars("eval_loss")] == [3, 6]


def test_peft_adapter_on_transformers_gives_our_logits(lora_run, mxfp4_base):
    result, output = lora_run
    assert (output / "adapter" / "adapter_config.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        mxfp4_base / "mxfp4", dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True))
    peft_model = PeftModel.from_pretrained(hf, output / "adapter").eval()
    tokens = np.random.default_rng(0).integers(0, 201088, (2, 9))
    with torch.no_grad():
        expected = peft_model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(result.model(tokens.astype(np.int32)))
    assert relative_error(ours, expected) <= 1e-5


def test_merged_mxfp4_export_loads_in_transformers(lora_run):
    """The merged export is a folder other tools load on their own: the model in transformers, and its tokenizer
    (tokenizer.json and its configs) in AutoTokenizer, whose chat template renders a conversation as
    harmony.encode_chat does, with the released generation_config's stop tokens."""
    _, output = lora_run
    merged = output / "merged"
    assert json.loads((merged / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        merged, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    question = "Count the rs: r, x, r."
    assert tokenizer.encode(question) == gptoss_jax.tokenizer.get_encoding().encode(question)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|return|>", "<|endoftext|>")
    chat = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, reasoning_effort="low")
    assert list(prompt if isinstance(prompt, list) else prompt["input_ids"]) == gptoss_jax.harmony.encode_chat(
        {"messages": chat, "reasoning_effort": "low"})
    assert transformers.GenerationConfig.from_pretrained(merged).eos_token_id == [200002, 199999, 200012]
    tokens = np.random.default_rng(1).integers(0, 201088, (1, 7))
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(gptoss_jax.load_model(merged, dtype="float32")(tokens.astype(np.int32)))
    assert relative_error(ours, expected) <= 1e-5


def test_the_run_measures_what_its_mxfp4_export_lost(lora_run):
    """Without QAT the export rounds the merged experts: the run reloads it and reports its held-out loss beside
    the trained model's (whatever the difference; the run's summary says it)."""
    result, output = lora_run
    final = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["step"] == 6 and final["eval_loss_trained"] == result.eval_losses[6]
    assert final["eval_loss_exported"] != final["eval_loss_trained"]  # rounding changed the model
    assert f"MXFP4 export: held-out loss {final['eval_loss_exported']:.4f}" in result.summary()


@pytest.fixture(scope="module")
def qat_run(mxfp4_base, tmp_path_factory):
    output = tmp_path_factory.mktemp("qat")
    return train(_config(output, mxfp4_base / "mxfp4", **LORA, **{"train.qat": True}), progress=False), output


def test_a_qat_run_exports_the_model_it_trained(qat_run):
    """LoRA on the experts of a packed base with train.qat: the merged MXFP4 export, in transformers and read back
    here, gives the trained model's logits, and the held-out loss the run measured on it is the trained one."""
    result, output = qat_run
    assert np.mean(result.losses[-2:]) < result.losses[0]
    tokens = np.random.default_rng(2).integers(0, 201088, (2, 9))
    trained = np.asarray(result.model(tokens.astype(np.int32)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        output / "merged", dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    with torch.no_grad():
        assert relative_error(hf(torch.tensor(tokens)).logits.numpy(), trained) <= 1e-5
    exported = gptoss_jax.load_model(output / "merged", dtype="float32")
    assert relative_error(exported(tokens.astype(np.int32)), trained) <= 1e-5
    final = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()][-1]
    assert abs(final["eval_loss_exported"] - final["eval_loss_trained"]) <= 1e-5 * final["eval_loss_trained"]


def test_full_fine_tuning_trains_every_parameter(mxfp4_base, tmp_path):
    config = _config(tmp_path / "full", mxfp4_base / "dense", **{"optimizer.learning_rate": 3e-3,
                                                                 "export.merged": False})
    result = train(config, progress=False)
    assert result.compiles == 1 and np.mean(result.losses[-2:]) < result.losses[0]
    base = gptoss_jax.load_model(mxfp4_base / "dense", dtype="float32")
    changed = [not np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
               for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(result.model)),
                                         nnx.to_flat_state(nnx.state(base)), strict=True)]
    assert all(changed)


def test_three_epochs_run_to_the_end_on_whole_batches(mxfp4_base, tmp_path):
    """Each shuffle of the examples packs its own number of rows (here 7, 8 and 8 steps of two 352-token rows): every
    step of every epoch still takes whole batches (it used to slice a short one at the end of a smaller epoch, and
    fail)."""
    config = _config(tmp_path / "epochs", mxfp4_base / "mxfp4", **{
        **LORA, "data.seq_len": 352, "data.synthetic.num_train": 32, "data.batch_size": 1, "optimizer.grad_accum": 2,
        "data.shuffle": "examples",
        "train.steps": 23, "train.eval_every": 1000, "train.checkpoint_every": 1000, "export.merged": False})
    stats = DataStats()
    batches = Batches(load_examples(config, config.data.train, split="train", stats=stats), config, stats)
    assert [batches.steps_in_epoch(epoch) for epoch in range(3)] == [7, 8, 8]  # 23 steps: three epochs
    assert {batches.batch(step).inputs.shape for step in range(23)} == {(2, 352)}
    result = train(config, progress=False)
    assert len(result.losses) == 23 and result.compiles == 1 and all(np.isfinite(result.losses))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(mxfp4_base, tmp_path):
    config = _config(tmp_path / "nan", mxfp4_base / "mxfp4", **{**LORA, "optimizer.learning_rate": 1e30,
                                                                "optimizer.clip_norm": 1e30,
                                                                "train.checkpoint_every": 1, "train.steps": 8})
    with pytest.raises(TrainingStopped, match=r"step \d+: loss .* the last good checkpoint is step \d+ in"):
        train(config, progress=False)
    assert any((tmp_path / "nan" / "checkpoints").iterdir())


def test_non_finite_weights_stop_the_run_before_anything_is_exported(mxfp4_base, tmp_path):
    """An infinite learning rate: the loss and gradients of the step are finite, the weights it writes are not.
    The run stops at that step (the norm of the updated weights is checked) and exports nothing."""
    config = _config(tmp_path / "inf", mxfp4_base / "mxfp4", **{**LORA, "optimizer.learning_rate": "inf",
                                                                "optimizer.warmup_steps": 0, "train.steps": 1,
                                                                "data.eval": ""})
    with pytest.raises(TrainingStopped, match=r"step 1: loss [0-9.]+, grad norm [0-9.]+, param norm (nan|inf)"):
        train(config, progress=False)
    assert not (tmp_path / "inf" / "adapter").exists() and not (tmp_path / "inf" / "merged").exists()


def test_an_export_is_written_whole_or_not_at_all_and_a_rerun_writes_what_is_missing(mxfp4_base, tmp_path,
                                                                                      monkeypatch):
    """The merged export fails half-way (as a run killed while writing it would): no merged/ appears, the
    adapter stays, and the rerun of the completed run writes merged/ instead of saying there is nothing to do. The
    run continued to more steps (train.steps raised) replaces its exports with the longer run's."""
    import gptoss_jax.train.run as run_module

    config = _config(tmp_path / "export", mxfp4_base / "mxfp4", **{**LORA, "train.steps": 2, "data.eval": ""})

    def killed(model, target, **kwargs):
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        raise KeyboardInterrupt("killed while exporting")

    monkeypatch.setattr(run_module, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False)
    assert (tmp_path / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "export" / "merged").exists()
    monkeypatch.undo()
    rerun = train(config, progress=False)
    assert rerun.summary() == "the run had already completed its 2 steps; exported what was missing: merged"
    assert list(rerun.exports) == ["merged"] and (tmp_path / "export" / "merged" / "config.json").is_file()
    assert not list((tmp_path / "export").glob(".*partial"))
    assert train(config, progress=False).summary() == "nothing to do: the run had already completed its 2 steps"
    adapter = tmp_path / "export" / "adapter" / "adapter_model.safetensors"
    before = adapter.read_bytes()
    longer = train(_config(tmp_path / "export", mxfp4_base / "mxfp4", **{**LORA, "train.steps": 3, "data.eval": ""}),
                   progress=False)
    assert sorted(longer.exports) == ["adapter", "merged"] and adapter.read_bytes() != before
    steps = [json.loads(line)["step"] for line in (tmp_path / "export" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3
    assert not list((tmp_path / "export").glob(".*partial")) + list((tmp_path / "export").glob(".*replaced"))


def test_exports_are_pushed_to_the_hub_and_metrics_reported_to_weights_and_biases(mxfp4_base, tmp_path,
                                                                                     monkeypatch):
    """export.push_to_hub uploads what the run exported (huggingface_hub's create_repo + upload_folder, the token
    from HF_TOKEN) to a stand-in for the hub (no network here): the merged checkpoint at the repo's root, the
    adapter under adapter/, every file byte for byte; a hub that refuses names the repo and where the exports
    are. train.report_to = "tensorboard,wandb" logs each step's metrics to a W&B run (offline here, read back
    from its file) as metrics.jsonl has them, with the config."""
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", "hf_stand_in")
    monkeypatch.setenv("WANDB_MODE", "offline")
    output = tmp_path / "pushed"
    config = _config(output, mxfp4_base / "mxfp4", **{**LORA, "train.steps": 2, "data.eval": "",
                                                      "export.push_to_hub": "someone/tiny-lora",
                                                      "train.report_to": "tensorboard,wandb"})
    with hub_stand_in() as (url, hub):
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)  # what HF_ENDPOINT sets at import
        train(config, progress=False)
    assert hub["repos"] == [{"name": "tiny-lora", "organization": "someone", "visibility": "private"}]
    assert hub["tokens"] == {"Bearer hf_stand_in"}
    expected = {f"someone/tiny-lora/{'adapter/' if kind == 'adapter' else ''}{file.relative_to(output / kind)}":
                file.read_bytes() for kind in ("merged", "adapter") for file in (output / kind).rglob("*")
                if file.is_file()}
    assert hub["files"] == expected and any(name.endswith("/config.json") for name in expected)
    # the root first; huggingface_hub may split a large folder into commits "(part 2)", ...
    assert list(dict.fromkeys(summary.split(" (part")[0] for _, summary in hub["commits"])) == [
        "gptoss-jax sft export at step 2: merged", "gptoss-jax sft export at step 2: adapter"]
    logged = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    wandb_config, rows = wandb_offline_history(output)
    assert [{key: row.get(key) for key in ("_step", "loss", "learning_rate")} for row in rows] == [
        {"_step": line["step"], "loss": line["loss"], "learning_rate": line["learning_rate"]} for line in logged]
    assert wandb_config["train"]["steps"] == 2 and (output / "tensorboard").is_dir()
    from gptoss_jax.train.run import push_to_hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nobody there
    with pytest.raises(OSError, match=r"export.push_to_hub: pushing to someone/tiny-lora failed .*the exports are "
                                      rf"written in {output / 'merged'}: push them with `hf upload"):
        push_to_hub({"merged": output / "merged"}, "someone/tiny-lora", private=True, message="m")


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_resume_replays_steps_once_in_the_metrics_and_names_a_changed_setting(mxfp4_base, tmp_path):
    """Killed after step 3 with the last checkpoint at step 2 (here: checkpoint 3 removed): the resumed run's
    metrics.jsonl has each step once. Resuming with another LoRA rank names the array, the setting and the
    checkpoint, and leaves nothing running (a restore that failed part-way left orbax's other reads to end on its
    closed event loop)."""
    settings = {**LORA, "train.steps": 3, "data.eval": "", "train.checkpoint_every": 2, "train.keep_checkpoints": 3,
                "train.async_checkpoints": False}
    output = tmp_path / "resumed"
    train(_config(output, mxfp4_base / "mxfp4", **settings), progress=False)
    shutil.rmtree(output / "checkpoints" / "3")
    shutil.rmtree(output / "adapter")
    shutil.rmtree(output / "merged")
    train(_config(output, mxfp4_base / "mxfp4", **settings), progress=False)
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3], steps
    with pytest.raises(ConfigError, match=r"checkpoints/3: the checkpoint does not fit this config's training "
                                          r"state \(\S+\.a\.value: saved float32\[1, 128, 8\], "
                                          r"now float32\[1, 128, 4\]: lora.rank"):
        train(_config(output, mxfp4_base / "mxfp4", **{**settings, "lora.rank": 4, "train.steps": 4}),
              progress=False)


def _train_in_subprocess(output: Path, base: Path, extra=()):
    overrides = {"model.checkpoint": base, "data.seq_len": 160, "data.batch_size": 2, "data.synthetic.num_train": 60,
                 "data.eval": "", "train.steps": 8, "train.checkpoint_every": 2, "optimizer.warmup_steps": 1,
                 "train.output_dir": output, **LORA}
    args = [f"--config.{key}={value}" for key, value in overrides.items()] + list(extra)
    command = [sys.executable, "-m", "gptoss_jax.cli", "train", "--config", str(DEMO), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_run_resumes_to_bit_identical_parameters(mxfp4_base, tmp_path):
    killed_run_resumes_bit_identically(lambda output: _train_in_subprocess(output, mxfp4_base / "mxfp4"), tmp_path)


def test_sigterm_checkpoints_and_exits(mxfp4_base, tmp_path):
    process = _train_in_subprocess(tmp_path / "term", mxfp4_base / "mxfp4", ["--config.train.steps=400",
                                                                            "--config.train.checkpoint_every=1000"])
    deadline = time.time() + 300
    while not (tmp_path / "term" / "metrics.jsonl").is_file() or not (tmp_path / "term" / "metrics.jsonl").read_text():
        assert time.time() < deadline and process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    steps = [int(p.name) for p in (tmp_path / "term" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 1 <= steps[0] < 400
    assert "SIGTERM: saved step" in output


def _train_on_8_devices(output: Path, processes: int, **overrides) -> list[float]:
    """`gptoss-jax train` of the tiny demo preset on a data=2 x fsdp=4 mesh of 8 CPU devices: one process with 8,
    or two jax.distributed processes (127.0.0.1, gloo) with 4 each. Returns the logged loss of each step."""
    settings = {"train.output_dir": output, "train.steps": 4, "train.log_every": 1, "train.checkpoint_every": 2,
                "train.async_checkpoints": False, "data.eval": "", "data.synthetic.num_train": 150,
                "data.seq_len": 128, "data.batch_size": 8, "mesh.data": 2, "mesh.fsdp": 4, "export.merged": False,
                "optimizer.warmup_steps": 1,
                **overrides}
    command = [sys.executable, "-m", "gptoss_jax.cli", "train", "--config", str(DEMO),
               *(f"--config.{key}={value}" for key, value in settings.items())]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    if processes > 1:
        port, = free_ports(1)
        command += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes)]
    runs = [subprocess.Popen(command + (["--process-id", str(i)] if processes > 1 else []), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(processes)]
    for run in runs:
        log, _ = run.communicate(timeout=600)
        assert run.returncode == 0, log[-4000:]
    return [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _tensors(directory: Path) -> dict:
    return {name: value for file in sorted(directory.glob("*.safetensors")) for name, value in load_file(file).items()}


def _same_tensors(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    for name, value in reference.items():
        assert relative_error(ours[name], value) <= 1e-5, name


def test_two_processes_train_like_one_and_share_checkpoints(tmp_path):
    """LoRA on two processes gives the losses and adapters of one process on as many devices (each process packs
    the same rows and feeds only its share); a checkpoint written by either resumes in the other."""
    lora = {"lora.enabled": True, "lora.targets": "*", "model.mxfp4": "packed", "optimizer.learning_rate": 1e-2}
    one, two = tmp_path / "one", tmp_path / "two"
    losses_one = _train_on_8_devices(one, 1, **lora)
    losses_two = _train_on_8_devices(two, 2, **lora)
    assert len(losses_one) == 4 and relative_error(losses_two, losses_one) <= 1e-5
    _same_tensors(_tensors(two / "adapter"), _tensors(one / "adapter"))
    # resume each run's step-4 checkpoint in the other arrangement, for two more steps
    shutil.copytree(one / "checkpoints", tmp_path / "one_then_two" / "checkpoints")
    shutil.copytree(two / "checkpoints", tmp_path / "two_then_one" / "checkpoints")
    after_two = _train_on_8_devices(tmp_path / "one_then_two", 2, **lora, **{"train.steps": 6})
    after_one = _train_on_8_devices(tmp_path / "two_then_one", 1, **lora, **{"train.steps": 6})
    assert len(after_one) == 2 and relative_error(after_two, after_one) <= 1e-5
    _same_tensors(_tensors(tmp_path / "one_then_two" / "adapter"), _tensors(tmp_path / "two_then_one" / "adapter"))


def test_two_processes_fine_tune_fully_like_one(tmp_path):
    """Full fine-tuning: the losses and every parameter (the exported checkpoint) of one process."""
    full = {"export.merged": True, "train.steps": 3}
    losses_one = _train_on_8_devices(tmp_path / "one", 1, **full)
    losses_two = _train_on_8_devices(tmp_path / "two", 2, **full)
    assert len(losses_one) == 3 and relative_error(losses_two, losses_one) <= 1e-5
    _same_tensors(_tensors(tmp_path / "two" / "merged"), _tensors(tmp_path / "one" / "merged"))


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "train").glob("*.py")), ids=lambda p: p.name)
def test_every_config_file_loads(path):
    config = load_config(path)
    assert config.train.steps > 0


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown key 'stepz' under train; valid keys: \[.*'steps'"):
        load_config(DEMO, ["--config.train.stepz=3"])
    with pytest.raises(ConfigError,
                       match=r"config.model.remat: expected one of \('none', 'full', 'dots', 'attention', 'offload'\)"):
        load_config(DEMO, ["--config.model.remat=some"])
    with pytest.raises(ConfigError, match=r"config.train.steps: invalid literal"):
        load_config(DEMO, ["--config.train.steps=many"])
    with pytest.raises(ConfigError, match=r"config.lora.targets: 'qq_proj' matches none of"):
        load_config(DEMO, ["--config.lora.enabled=true", "--config.model.mxfp4=packed",
                           "--config.lora.targets=qq_proj"])
    with pytest.raises(ConfigError, match="full fine-tuning trains the experts"):
        load_config(DEMO, ["--config.model.mxfp4=packed"])


def test_a_typo_inside_a_config_file_names_the_key_and_the_nearest_one(tmp_path):
    """Keys a config file sets are checked against the defaults as overrides are (a misspelt key used to load
    and run with the setting it meant left at its default)."""
    from gptoss_jax.eval import sweep

    train_file = tmp_path / "typo.py"
    train_file.write_text("from gptoss_jax.train.config import defaults\n\n\ndef get_config():\n"
                          "    c = defaults()\n    c.train.stpes = 3\n    c.lora.enabeld = True\n    return c\n")
    with pytest.raises(ConfigError, match=r"typo.py: config.lora.enabeld is not a setting \(did you mean "
                                          r"config.lora.enabled\?\); config.train.stpes is not a setting \(did "
                                          r"you mean config.train.steps\?\)$"):
        load_config(train_file)
    eval_file = tmp_path / "eval_typo.py"
    eval_file.write_text("from gptoss_jax.eval.sweep import defaults\n\n\ndef get_config():\n"
                         "    c = defaults()\n    c.data.synthetic.cuont = 3\n    return c\n")
    with pytest.raises(ConfigError, match=r"config.data.synthetic.cuont is not a setting \(did you mean "
                                          r"config.data.synthetic.count\?\)"):
        sweep.load_config(eval_file)


def test_plan_reports_per_device_memory():
    from gptoss_jax.train.plan import plan

    config = load_config(DEMO, ["--config.data.seq_len=128", "--config.data.batch_size=1"])
    report = plan(config, device_memory=2**30)
    total, _ = gptoss_jax.parameter_counts(gptoss_jax.GptOssConfig.tiny())
    assert report.devices == 1 and report.frozen_bytes == 0 and report.trainable_bytes == 4 * total
    # Adam: two float32 moments per trained parameter, plus two step counters
    assert 0 <= report.optimizer_bytes - 2 * report.trainable_bytes <= 64
    assert report.batch_bytes == 5 * 128 * 4 and report.temporary_bytes > 0
    assert report.cpu_copy_bytes == 0  # a float32 step has no bfloat16 to copy
    assert ("fits" if report.total_bytes <= 2**30 else "does NOT fit") + " in 1.0 GiB" in report.report()


def test_plan_separates_the_cpu_copies_of_bfloat16_arrays():
    """A bf16 step compiled on a CPU: the float32 copies XLA's CPU backend makes for its loops are found, are
    at least one float32 copy of the bf16 attention weights the layer loop reads, and leave the GPU figure."""
    from gptoss_jax.train.plan import plan

    config = load_config(DEMO, ["--config.data.seq_len=128", "--config.data.batch_size=1",
                                "--config.model.compute_dtype=bfloat16", "--config.lora.enabled=true",
                                "--config.model.mxfp4=packed"])
    report = plan(config, device_memory=2**30)
    c = gptoss_jax.GptOssConfig.tiny()
    attention = c.num_hidden_layers // 2 * c.hidden_size * c.head_dim * (
        2 * c.num_attention_heads + 2 * c.num_key_value_heads)  # one stack's q, k, v, o weights
    assert 4 * attention <= report.cpu_copy_bytes < report.temporary_bytes
    assert report.gpu_bytes == report.total_bytes - report.cpu_copy_bytes
    assert "total on a GPU" in report.report() and "float32 copies of bf16 arrays" in report.report()


@pytest.mark.parametrize("remat", ["full", "dots", "attention", "offload"])
def test_remat_policies_give_the_gradients_of_no_remat(remat):
    """Recomputing the forward pass in the backward (per layer, each policy) changes nothing; sequences longer
    than an attention block, so the blockwise attention's saved results are what the policy keeps. ("offload"
    keeps the layer inputs in host memory: on a CPU that is the same memory, but the program moves them there.)"""
    config = gptoss_jax.GptOssConfig.tiny().replace(vocab_size=512, attention_block=16)
    model = gptoss_jax.GptOss(config, dtype="float32", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = np.random.default_rng(0).integers(0, 512, (2, 40)).astype(np.int32)

    def loss(params, remat):
        model = nnx.merge(graphdef, params)
        hidden, router = model.hidden_states(tokens, remat=remat)
        return jnp.mean(model.logits(hidden) ** 2) + router.sum()

    reference = jax.grad(loss)(params, "none")
    for mine, expected in zip(jax.tree.leaves(jax.grad(loss)(params, remat)), jax.tree.leaves(reference),
                              strict=True):
        if np.abs(np.asarray(expected)).max() > 0:
            assert relative_error(mine, expected) <= 1e-5
        else:  # the embedding rows of tokens not in the batch
            assert not np.asarray(mine).any()


def test_chunked_cross_entropy_equals_a_plain_one():
    """token_losses (chunks, counted tokens first, chunks of uncounted tokens skipped, custom VJP) against a
    plain cross-entropy over the whole logits: the loss and the gradients of hidden states and unembedding."""
    from gptoss_jax.train.loss import token_losses

    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 700, 32)), jnp.float32)
    unembedding = jnp.asarray(rng.normal(size=(300, 32)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 300, (2, 700)), jnp.int32)
    weights = np.where(rng.random((2, 700)) < 0.2, rng.random((2, 700)), 0).astype(np.float32)
    weights[1] = 0  # a whole row of prompt: all-uncounted chunks
    weights = jnp.asarray(weights)

    def plain(hidden, unembedding):
        logits = jnp.einsum("btd,vd->btv", hidden, unembedding)
        target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(weights * (jax.nn.logsumexp(logits, axis=-1) - target))

    def chunked(hidden, unembedding):
        return token_losses(hidden, unembedding, targets, weights)

    assert relative_error(chunked(hidden, unembedding), plain(hidden, unembedding)) <= 1e-6
    ours = jax.grad(chunked, argnums=(0, 1))(hidden, unembedding)
    theirs = jax.grad(plain, argnums=(0, 1))(hidden, unembedding)
    for mine, expected in zip(ours, theirs, strict=True):
        assert relative_error(mine, expected) <= 1e-5
    assert not np.asarray(ours[0][1]).any()  # uncounted tokens get no gradient


@pytest.mark.parametrize("packed", [False, True])
def test_experts_in_token_tiles_give_the_outputs_and_gradients_of_all_at_once(packed):
    """model.moe_tile: the MoE a tile of tokens at a time, each tile recomputed in the backward (the last one
    padded) — the same outputs and gradients, dense experts or a packed base with expert adapters."""
    base = gptoss_jax.GptOssConfig.tiny().replace(vocab_size=512)
    tokens = np.random.default_rng(0).integers(0, 512, (2, 40)).astype(np.int32)
    results = []
    for tile in (0, 24):  # 80 tokens: four tiles, the last of 8
        model = gptoss_jax.GptOss(base.replace(moe_tile=tile), dtype="float32", mxfp4_experts=packed,
                                  rngs=nnx.Rngs(0))
        if packed:
            lora.add_lora(model, lora.LoraConfig(rank=4, alpha=8.0, targets=("gate_up_proj", "down_proj")),
                          rngs=nnx.Rngs(1))
            adapters = nnx.state(model, LoRAParam)  # b starts at zero: make the adapters count
            nnx.update(model, jax.tree.map(lambda a: 0.1 * jax.random.normal(jax.random.key(2), a.shape, a.dtype),
                                           adapters))
        graphdef, trained, rest = nnx.split(model, LoRAParam if packed else nnx.Param, ...)

        def loss(trained, graphdef=graphdef, rest=rest):
            model = nnx.merge(graphdef, trained, rest)
            hidden, router = model.hidden_states(tokens, remat="full")
            return jnp.mean(model.logits(hidden) ** 2) + router.sum()

        results.append(jax.value_and_grad(loss)(trained))
    (untiled, untiled_grads), (tiled, tiled_grads) = results
    assert abs(float(tiled) / float(untiled) - 1) <= 1e-6
    for mine, expected in zip(jax.tree.leaves(tiled_grads), jax.tree.leaves(untiled_grads), strict=True):
        if np.abs(np.asarray(expected)).max() > 0:
            assert relative_error(mine, expected) <= 1e-5
