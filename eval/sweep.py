"""`gptoss-jax eval`: tasks x reasoning efforts x samples per problem, each sample graded and written to
`samples.jsonl` as soon as its chunk is generated; a rerun skips the samples already there (and retries failed
ones, and redoes those whose problem has changed), then `summary.json`, `report.md` and
`accuracy_vs_reasoning.png` are written from the samples. Each sample is drawn with its own seed, so what it
draws does not depend on the chunk it was generated in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import ml_collections
from tqdm import tqdm

from gptoss_jax import harmony
from gptoss_jax import tokenizer as tok
from gptoss_jax.eval import report
from gptoss_jax.eval.backends import JaxBackend, OpenAIBackend, Request, seed_of
from gptoss_jax.eval.graders import answer_format, answer_text, grade
from gptoss_jax.eval.tasks import Problem, load_task, task_name, task_tools
from gptoss_jax.settings import ConfigError, read_config, setting

log = logging.getLogger(__name__)

SAMPLES_FILE, SETTINGS_FILE = "samples.jsonl", "settings.json"
# Settings that change what a sample's generation is; a rerun into the same output_dir must keep them. (A changed
# problem — prompt, answer or grader — is caught per sample: its old record is not reused.)
_GENERATION_KEYS = ("backend", "model.checkpoint", "model.dtype", "model.lora", "endpoint.base_url", "endpoint.model",
                    "max_tokens", "temperature", "top_p", "seed", "response_format", "max_turns", "browser_docs")


def defaults() -> ml_collections.ConfigDict:
    """Every eval setting, with what it means; the values are the embedded tiny demo's (configs/eval/tiny_demo.py):
    the model `gptoss-jax train --config configs/train/tiny_demo.py` exports, on its held-out counting questions."""
    ConfigDict = ml_collections.ConfigDict
    c = ConfigDict()
    c.backend = "jax"  # jax: the model in this process | openai: an OpenAI-compatible endpoint (endpoint.*)

    c.model = ConfigDict()
    c.model.checkpoint = "runs/tiny_demo/merged"  # checkpoint directory or hub id (backend jax)
    c.model.dtype = "float32"  # bfloat16 | float32
    c.model.mesh = ""  # device mesh, e.g. "expert=4,tensor=2"; empty: one device
    c.model.lora = ""  # a PEFT LoRA adapter directory to put on the model
    c.model.kernels = "auto"  # attention and MXFP4 experts: auto (the Pallas kernels on a GPU, XLA elsewhere) | xla
    # | pallas

    c.endpoint = ConfigDict()
    c.endpoint.base_url = ""  # e.g. http://127.0.0.1:8000/v1 (backend openai)
    c.endpoint.model = ""  # model id to ask for; empty: the first the endpoint lists
    c.endpoint.api_key_env = "OPENAI_API_KEY"  # environment variable holding the API key (if any)
    c.endpoint.timeout = 600.0  # seconds per request

    c.tasks = ("synthetic",)  # gsm8k, aime, gpqa, math, synthetic, or paths of custom JSONL files; "+python",
    # "+browser" after a name lets the model call those built-in tools (e.g. "aime+python"; backend jax)
    c.max_turns = 16  # with tools: generations per sample (each tool call takes one), each up to max_tokens
    c.browser_docs = ""  # the folder of documents the browser tool searches (tasks with +browser)
    c.unsafe_python_tool = False  # run the python tool without its sandbox (README: the python tool's sandbox)
    c.efforts = ("low", "medium", "high")  # reasoning efforts swept
    c.samples = 1  # samples per problem (pass@k is reported for k up to this)
    c.limit = 0  # the first N problems of each task; 0: all
    c.max_tokens = 160  # tokens generated per sample (analysis + final); more is a truncation
    c.temperature = 0.0  # 0: greedy (the gpt-oss evals sample at 1.0)
    c.top_p = 1.0
    c.response_format = ""  # "": free text | "json": the final answer as {"answer": ...}, held to it by the sampler
    c.seed = 0  # sampling seed (each sample derives its own from it) and the GPQA choice-shuffling seed
    c.batch_size = 100  # samples handed to the backend together: the jax backend's engine, or concurrent requests
    c.slots = 0  # jax backend: samples decoding at once, the others of a chunk taking the slots that finished
    # samples free (continuous batching: a long sample holds up no other); 0: the whole chunk at once
    c.output_dir = "runs/tiny_demo/eval"  # samples.jsonl, summary.json, report.md, accuracy_vs_reasoning.png

    c.data = ConfigDict()  # where each built-in task's problems come from: a local file or directory, or a hub id
    for name, source, split in (("gsm8k", "openai/gsm8k", "main/test"), ("aime", "opencompass/AIME2025", ""),
                                ("gpqa", "Idavidrein/gpqa", "gpqa_diamond"),
                                ("math", "HuggingFaceH4/MATH-500", "test")):
        c.data[name] = ConfigDict({"source": source, "split": split})  # split: files whose path contains it
    c.data.synthetic = ConfigDict()
    c.data.synthetic.count = 200  # problems generated (200: a standard error of about 3 points per effort)
    c.data.synthetic.seed = 1  # generator seed (1: the tiny demo's held-out set)
    return c


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """An eval config file with `--config.a.b=value` overrides, validated."""
    config = read_config(path, overrides, reference=defaults())
    validate(config)
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    if config.backend not in ("jax", "openai"):
        raise ConfigError(f"config.backend: expected 'jax' or 'openai', got {config.backend!r}")
    if config.backend == "openai" and not config.endpoint.base_url:
        raise ConfigError("config.endpoint.base_url: the openai backend needs the endpoint's URL")
    if config.backend == "jax" and not config.model.checkpoint:
        raise ConfigError("config.model.checkpoint: the jax backend needs a checkpoint")
    if not config.tasks or not config.efforts:
        raise ConfigError(f"config.tasks and config.efforts: at least one of each, got {config.tasks}, "
                          f"{config.efforts}")
    for effort in config.efforts:
        if effort not in harmony.EFFORTS:
            raise ConfigError(f"config.efforts: {effort!r} is not one of {harmony.EFFORTS}")
    for key in ("samples", "max_tokens", "batch_size"):
        if config[key] < 1:
            raise ConfigError(f"config.{key}: must be positive, got {config[key]}")
    if config.slots < 0:
        raise ConfigError(f"config.slots: must be >= 0 (0: the whole chunk at once), got {config.slots}")
    if config.response_format not in ("", "json"):
        raise ConfigError(f"config.response_format: expected '' or 'json', got {config.response_format!r}")
    if config.limit < 0 or config.temperature < 0 or not 0 < config.top_p <= 1:
        raise ConfigError(f"config: limit >= 0, temperature >= 0 and top_p in (0, 1] are required; got "
                          f"{config.limit}, {config.temperature}, {config.top_p}")
    tools = {tool for entry in config.tasks for tool in task_tools(entry)[1]}
    if tools and config.backend != "jax":
        raise ConfigError(f"config.tasks: built-in tools ({', '.join(sorted(tools))}) run with backend 'jax' only")
    if "browser" in tools and not config.browser_docs:
        raise ConfigError("config.browser_docs: tasks with +browser need a folder of documents to search")
    if config.max_turns < 1:
        raise ConfigError(f"config.max_turns: must be positive, got {config.max_turns}")
    names = [task_name(entry) for entry in config.tasks]
    if len(set(names)) < len(names):
        raise ConfigError(f"config.tasks: two tasks share a name: {names}")


@dataclasses.dataclass
class Sweep:
    summary: dict[str, Any]
    output_dir: Path
    generated: int  # samples generated by this run (the rest were on disk)

    @property
    def report(self) -> Path:
        return self.output_dir / report.REPORT_FILE


def run(config: ml_collections.ConfigDict, *, progress: bool = True, backend=None) -> Sweep:
    """Runs the samples not yet in `output_dir`, then writes the summary, the report and the plot. `backend`: one
    already made (e.g. a JaxBackend on a model being trained) instead of the one the config describes."""
    validate(config)
    output = Path(config.output_dir)
    tasks = {task_name(entry): load_task(entry, config.data, limit=config.limit, seed=config.seed)
             for entry in config.tasks}
    tools = {task_name(entry): task_tools(entry)[1] for entry in config.tasks}
    samples_file = output / SAMPLES_FILE
    _check_settings(output, config)
    records = _read_samples(samples_file)

    def done(name: str, effort: str, problem: Problem, k: int) -> bool:
        """On disk, generated without error, for this very problem (not one since edited in the task file)."""
        record = records.get(_key(name, effort, problem.id, k))
        return (record is not None and record["error"] is None
                and (record["prompt"], record["answer"], record["grader"]) == (problem.prompt, problem.answer,
                                                                              problem.grader))

    todo = [(name, effort, [(problem, k) for problem, k in chunk if not done(name, effort, problem, k)])
            for name, problems in tasks.items() for effort in config.efforts
            for chunk in _chunks(problems, config.samples, config.batch_size)]
    todo = [(name, effort, chunk) for name, effort, chunk in todo if chunk]
    generated = sum(len(chunk) for _, _, chunk in todo)
    if todo:
        backend = backend or _backend(config)
        log.info("eval: %d samples to generate with %s", generated, backend.describe)
        output.mkdir(parents=True, exist_ok=True)
        (output / SETTINGS_FILE).write_text(json.dumps(_settings(config), indent=2) + "\n")
        with open(samples_file, "a", encoding="utf-8") as out, \
                tqdm(total=generated, desc="eval", unit="sample", disable=not progress) as bar:
            for name, effort, chunk in todo:
                requests = [Request(problem.prompt, effort, seed_of(config.seed, name, effort, problem.id, k),
                                    answer_format(problem.grader) if config.response_format else None,
                                    tools[name])
                            for problem, k in chunk]
                start, shown = time.perf_counter(), bar.n
                replies = backend(requests, finished=lambda: bar.update(1))
                seconds = (time.perf_counter() - start) / len(chunk)
                for (problem, k), reply in zip(chunk, replies, strict=True):
                    record = _record(name, effort, problem, k, reply, seconds, config.response_format, tools[name])
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    records[_key(name, effort, problem.id, k)] = record
                out.flush()
                bar.update(shown + len(chunk) - bar.n)  # the samples the backend did not count as they ended
    cells = [(name, effort, [records[_key(name, effort, problem.id, k)] for problem in problems
                             for k in range(config.samples)])
             for name, problems in tasks.items() for effort in config.efforts]
    model = config.endpoint.base_url if config.backend == "openai" else config.model.checkpoint
    summary = report.summarise(cells, config.samples, settings=_settings(config), model=model)
    report.write(summary, output)
    return Sweep(summary, output, generated)


def _key(task: str, effort: str, problem: str, sample: int) -> tuple[str, str, str, int]:
    return task, effort, problem, sample


def _chunks(problems: list[Problem], samples: int, size: int) -> list[list[tuple[Problem, int]]]:
    """A (task, effort)'s (problem, sample index) pairs in order, cut into chunks of `size`."""
    pairs = [(problem, k) for problem in problems for k in range(samples)]
    return [pairs[i:i + size] for i in range(0, len(pairs), size)]


def _record(task: str, effort: str, problem: Problem, sample: int, reply, seconds: float,
            response_format: str, tools: tuple[str, ...]) -> dict[str, Any]:
    encoding = tok.get_encoding()
    answer = answer_text(problem.grader, reply.final) if response_format else reply.final
    graded = grade(problem.grader, answer, problem.answer) if reply.error is None else None
    return {
        "task": task, "effort": effort, "problem": problem.id, "sample": sample,
        "prompt": problem.prompt, "answer": problem.answer, "grader": problem.grader,
        "output": reply.output, "analysis": reply.analysis, "final": reply.final,
        "parsed": graded.parsed if graded else None, "correct": bool(graded and graded.correct),
        "truncated": reply.truncated,
        "analysis_tokens": len(encoding.encode(reply.analysis, disallowed_special=())),
        "final_tokens": len(encoding.encode(reply.final, disallowed_special=())),
        "completion_tokens": reply.completion_tokens, "seconds": seconds, "error": reply.error,
        "tools": list(tools), "tool_calls": list(reply.tool_calls),
    }


def _read_samples(path: Path) -> dict[tuple, dict[str, Any]]:
    """Every sample on disk by key (a later line replaces an earlier one). A last line cut short by an interrupted
    run is dropped from the file, so appending starts on a fresh line."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        path.write_bytes(data)
        log.warning("%s: dropped a sample line cut short by an interrupted run", path)
    records = {}
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
            records[_key(record["task"], record["effort"], record["problem"], record["sample"])] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: not a sample record; is this the output of another program?") from None
    return records


def _settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {key: setting(config, key) for key in _GENERATION_KEYS}


def _check_settings(output: Path, config: ml_collections.ConfigDict) -> None:
    """Samples already in `output` must come from the same generation settings (written with the first sample)."""
    path, settings = output / SETTINGS_FILE, _settings(config)
    samples = output / SAMPLES_FILE
    if path.exists() and samples.exists() and samples.stat().st_size:
        recorded, default = json.loads(path.read_text()), defaults()  # a key added since then reads as its default
        recorded = {key: recorded.get(key, setting(default, key)) for key in settings}
        changed = [key for key in settings if recorded[key] != settings[key]]
        if changed:
            raise ConfigError(f"{output}: holds samples made with other settings ({', '.join(changed)}: "
                              f"{[recorded[k] for k in changed]} then, {[settings[k] for k in changed]} now); "
                              f"choose another config.output_dir or delete that one")


def _backend(config: ml_collections.ConfigDict):
    sampling = {"max_tokens": config.max_tokens, "temperature": config.temperature, "top_p": config.top_p}
    if config.backend == "openai":
        endpoint = config.endpoint
        return OpenAIBackend(endpoint.base_url, model=endpoint.model, api_key_env=endpoint.api_key_env,
                             timeout=endpoint.timeout, **sampling)
    from gptoss_jax.generation import Generator
    from gptoss_jax.inference import load_for_inference

    model = load_for_inference(config.model.checkpoint, dtype=config.model.dtype, mesh=config.model.mesh,
                               lora=config.model.lora or None, kernels=config.model.kernels)
    return JaxBackend(Generator(model), **sampling, slots=config.slots or None, max_turns=config.max_turns,
                      browser_docs=config.browser_docs or None, unsafe_python_tool=config.unsafe_python_tool)
