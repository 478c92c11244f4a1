"""The eval sweep on the tiny demo model: files it writes, resume after SIGKILL, the OpenAI-compatible backend
against `gptoss-jax serve`, and failures that are recorded rather than lost."""

import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import jsonschema
import pytest
from flax import nnx

import gptoss_jax
from gptoss_jax import harmony, synthetic
from gptoss_jax.cli import main
from gptoss_jax.eval import report, sweep
from gptoss_jax.eval.backends import BackendError
from gptoss_jax.eval.graders import answer_format, grade
from gptoss_jax.generation import Generator
from gptoss_jax.train.config import ConfigError

from helpers import free_ports, serving

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "eval" / "tiny_demo.py"
COMPARED = ("analysis", "final", "parsed", "correct", "truncated", "analysis_tokens", "final_tokens")


def _config(output, checkpoint, **settings):
    config = sweep.load_config(CONFIG, [f"--config.model.checkpoint={checkpoint}", f"--config.output_dir={output}",
                                        "--config.data.synthetic.count=6", "--config.max_tokens=64"])
    for key, value in settings.items():
        node = config
        *parents, name = key.split(".")
        for parent in parents:
            node = node[parent]
        node[name] = value
    return config


def _samples(output):
    return [json.loads(line) for line in (Path(output) / sweep.SAMPLES_FILE).read_text().splitlines()]


def _untimed(summary):
    return [{k: v for k, v in row.items() if k not in report.TIMING_KEYS} for row in summary["results"]]


def test_sweep_writes_graded_samples_summary_report_and_plot(demo_model_dir, tmp_path):
    """A sweep streamed through 4 engine slots (continuous batching): every sample is what generation alone gives
    its prompt; the summary, report and plot follow the samples; a rerun (at another slot count) adds only what is
    missing."""
    result = sweep.run(_config(tmp_path / "eval", demo_model_dir, slots=4), progress=False)
    records = _samples(tmp_path / "eval")
    assert result.generated == len(records) == 18  # 6 problems x 3 efforts x 1 sample
    generator = Generator(gptoss_jax.load_model(demo_model_dir, dtype="float32"))
    for record in records[::2]:  # each sample is what generation gives for its prompt at its effort
        prompt = harmony.encode_chat({"messages": [{"role": "user", "content": record["prompt"]}],
                                      "reasoning_effort": record["effort"]})
        tokens = generator.generate([prompt], 64)[0]
        assert record["output"] == gptoss_jax.tokenizer.get_encoding().decode(tokens)
    for record in records:
        assert (record["parsed"], record["correct"]) == grade("numeric", record["final"], record["answer"])
        assert record["error"] is None and record["final"]  # the demo model answers on the final channel
    rows = result.summary["results"]
    assert [(row["task"], row["effort"]) for row in rows] == [("synthetic", e) for e in ("low", "medium", "high")]
    for row in rows:
        mine = [r for r in records if r["effort"] == row["effort"]]
        assert row["accuracy"] == pytest.approx(sum(r["correct"] for r in mine) / 6)
        assert row["analysis_tokens_mean"] == pytest.approx(sum(r["analysis_tokens"] for r in mine) / 6)
        assert row["truncated_rate"] == pytest.approx(sum(r["truncated"] for r in mine) / 6)
    assert json.loads((tmp_path / "eval" / report.SUMMARY_FILE).read_text()) == result.summary
    assert "| synthetic | high |" in result.report.read_text()
    assert (tmp_path / "eval" / report.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = sweep.run(_config(tmp_path / "eval", demo_model_dir), progress=False)  # nothing left to do
    assert again.generated == 0 and _untimed(again.summary) == _untimed(result.summary)
    more = sweep.run(_config(tmp_path / "eval", demo_model_dir, **{"data.synthetic.count": 7}), progress=False)
    assert more.generated == 3 and more.summary["results"][0]["problems"] == 7  # only the new problem, per effort
    with pytest.raises(ConfigError, match="other settings .*max_tokens"):  # samples from other settings: refuse
        sweep.run(_config(tmp_path / "eval", demo_model_dir, max_tokens=32), progress=False)


def test_resume_after_sigkill_gives_the_uninterrupted_summary(demo_model_dir, tmp_path):
    """Sampled at temperature 1 with 2 samples per problem, so every sample's seed and chunk matter."""
    settings = {"temperature": 1.0, "samples": 2, "batch_size": 4}
    command = [sys.executable, "-m", "gptoss_jax.cli", "eval", "--config", str(CONFIG),
               f"--config.model.checkpoint={demo_model_dir}", f"--config.output_dir={tmp_path / 'killed'}",
               "--config.data.synthetic.count=6", "--config.max_tokens=64",
               *(f"--config.{key}={value}" for key, value in settings.items())]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples_file = tmp_path / "killed" / sweep.SAMPLES_FILE
    deadline = time.time() + 300
    while not (samples_file.exists() and samples_file.read_bytes().count(b"\n") >= 4):
        assert process.poll() is None and time.time() < deadline, "the sweep ended before it could be killed"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = samples_file.read_bytes().count(b"\n")
    assert 4 <= written < 36
    with open(samples_file, "a") as out:  # as if the kill had cut a line in half
        out.write('{"task": "synthetic", "effort": "hi')

    resumed = sweep.run(_config(tmp_path / "killed", demo_model_dir, **settings), progress=False)
    whole = sweep.run(_config(tmp_path / "whole", demo_model_dir, **settings), progress=False)
    assert resumed.generated == 36 - written and whole.generated == 36
    assert _untimed(resumed.summary) == _untimed(whole.summary)
    assert "pass@2" in resumed.summary["results"][0]
    key = lambda r: (r["effort"], r["problem"], r["sample"])
    assert sorted(map(key, _samples(tmp_path / "killed"))) == sorted(map(key, _samples(tmp_path / "whole")))


def test_demo_model_reads_the_effort_line_and_is_right_more_often_the_more_it_writes(demo_model_dir, tmp_path):
    """The README's first command, evaluated as shipped (200 held-out problems, greedy): the fine-tuned model starts
    (nearly) every analysis with its effort's word — it reads the effort line — and is right more often the more
    of the count it writes out. Goals: high >= 60% and >= 30 points above low; medium at least 10 points above
    low and 10 below high. The untrained model answers at most 15%."""
    result = sweep.run(sweep.load_config(CONFIG, [f"--config.model.checkpoint={demo_model_dir}",
                                                  f"--config.output_dir={tmp_path / 'trained'}"]), progress=False)
    samples = _samples(tmp_path / "trained")
    for effort, header in synthetic.HEADERS.items():
        started = [s["analysis"].startswith(f"{header}:") for s in samples if s["effort"] == effort]
        assert sum(started) >= 0.95 * len(started), (effort, sum(started), len(started))
    accuracy = {row["effort"]: row["accuracy"] for row in result.summary["results"]}
    assert accuracy["high"] >= 0.6 and accuracy["high"] >= accuracy["low"] + 0.3, accuracy
    assert accuracy["low"] + 0.1 <= accuracy["medium"] <= accuracy["high"] - 0.1, accuracy
    untrained = tmp_path / "untrained"
    model = gptoss_jax.GptOss(gptoss_jax.GptOssConfig.tiny(), dtype="float32", rngs=nnx.Rngs(0))  # as training starts
    gptoss_jax.save_pretrained(model, untrained, mxfp4=False)
    baseline = sweep.run(sweep.load_config(CONFIG, [f"--config.model.checkpoint={untrained}", "--config.limit=20",
                                                    f"--config.output_dir={tmp_path / 'baseline'}"]),
                         progress=False).summary["results"]
    assert max(row["accuracy"] for row in baseline) <= 0.15 < accuracy["high"] - 0.3


def test_the_progress_bar_counts_each_sample_as_it_ends(demo_model_dir):
    """The in-process backend reports each row of a batch as it writes its stop token (the eval's progress bar
    moves per sample, not per batch); rows cut by max_tokens are left for the caller to count."""
    from gptoss_jax.eval.backends import JaxBackend, Request

    backend = JaxBackend(Generator(gptoss_jax.load_model(demo_model_dir, dtype="float32")), max_tokens=20,
                         temperature=0.0, top_p=1.0)
    question = "Count the rs, starting again from zero at every x: r, s, x, r, r, a, t, r, o, x, r, e."
    requests = [Request(question, effort, seed=0) for effort in ("low", "medium", "high", "low", "high")]
    finished = []
    replies = backend(requests, finished=lambda: finished.append(1))
    # a low reply is 16 tokens; medium and high write 26 of analysis alone
    assert [reply.truncated for reply in replies] == [False, True, True, False, True]
    assert len(finished) == 2


def test_endpoint_backend_against_the_server_equals_in_process(demo_model_dir, tmp_path):
    """`gptoss-jax serve` in its own process, asked through the openai client: the same samples at temperature 0.
    A prompt longer than the server's context is answered 400: that sample is recorded as failed, the rest run."""
    custom = tmp_path / "custom.jsonl"
    question = "Count the rs, starting again from zero at every x: r, r, x, r, s, r, a, o, r, t, i, e."
    custom.write_text(json.dumps({"prompt": question, "answer": "3", "grader": "numeric"}) + "\n"
                      + json.dumps({"prompt": "word " * 600, "answer": "1", "grader": "numeric", "id": "long"}) + "\n")
    in_process = sweep.run(_config(tmp_path / "jax", demo_model_dir), progress=False)
    with serving(demo_model_dir, "--slots", "8", "--max-context", "512") as url:
        config = _config(tmp_path / "endpoint", demo_model_dir, backend="openai", tasks=("synthetic", str(custom)))
        config.endpoint.base_url = url + "/v1"
        through_server = sweep.run(config, progress=False)
        records = _samples(tmp_path / "endpoint")
        failed = [r for r in records if r["error"] is not None]
        assert [(r["problem"], r["task"]) for r in failed] == [("long", "custom")] * 3  # one per effort
        assert "maximum context" in failed[0]["error"] or "400" in failed[0]["error"]
        rerun = sweep.run(config, progress=False)  # a rerun retries the failed samples only
        assert rerun.generated == 3
        lines = custom.read_text().splitlines()  # a problem edited since: its old samples are not reused
        custom.write_text(lines[0].replace('"answer": "3"', '"answer": "7"') + "\n" + lines[1] + "\n")
        edited = sweep.run(config, progress=False)
        assert edited.generated == 6
        assert {r["answer"] for r in _samples(tmp_path / "endpoint")[-6:] if r["problem"] == "0"} == {"7"}
    expected = {(r["effort"], r["problem"]): r for r in _samples(tmp_path / "jax")}
    served = [r for r in records if r["task"] == "synthetic"]
    assert len(served) == 18
    for record in served:
        mine = expected[(record["effort"], record["problem"])]
        assert {k: record[k] for k in COMPARED} == {k: mine[k] for k in COMPARED}
        if not record["truncated"]:  # an endpoint's output is rebuilt from its two channels: equal when complete
            assert record["output"] == mine["output"]
    assert _untimed(through_server.summary)[:3] == _untimed(in_process.summary)
    custom_rows = [row for row in through_server.summary["results"] if row["task"] == "custom"]
    assert [row["failed_rate"] for row in custom_rows] == [0.5] * 3


def test_answers_asked_as_json_always_parse_in_process_and_through_the_server(demo_model_dir, tmp_path):
    """With response_format "json" the demo model (trained to answer in words) writes {"answer": <number>} every
    time, held to the numeric grader's schema, and the endpoint backend asks the server for the same format."""
    # JSON numbers are decimals: read as Decimal, 1.566016 is a multiple of 1e-06 (as floats it is not)
    schema = json.loads(json.dumps(answer_format("numeric")["json_schema"]["schema"]), parse_float=Decimal)
    in_process = sweep.run(_config(tmp_path / "jax", demo_model_dir, response_format="json",
                                   efforts=("low", "high")), progress=False)
    for row in in_process.summary["results"]:
        assert (row["parse_failure_rate"], row["truncated_rate"], row["failed_rate"]) == (0, 0, 0)
    records = _samples(tmp_path / "jax")
    for record in records:
        jsonschema.validate(json.loads(record["final"], parse_float=Decimal), schema)
        assert record["parsed"] is not None
    assert 'JSON {"answer": ...}' in in_process.report.read_text()
    free = _samples(Path(sweep.run(_config(tmp_path / "free", demo_model_dir, efforts=("low",)),
                                   progress=False).output_dir))
    assert not any(r["final"].startswith("{") for r in free)  # in words when not asked
    with serving(demo_model_dir, "--slots", "8", "--max-context", "512") as url:
        config = _config(tmp_path / "endpoint", demo_model_dir, backend="openai", response_format="json",
                         efforts=("low", "high"))
        config.endpoint.base_url = url + "/v1"
        sweep.run(config, progress=False)
    expected = {(r["effort"], r["problem"]): r for r in records}
    for record in _samples(tmp_path / "endpoint"):
        mine = expected[(record["effort"], record["problem"])]
        assert {k: record[k] for k in COMPARED} == {k: mine[k] for k in COMPARED}


def test_unreachable_endpoint_is_a_clear_error(tmp_path, capsys):
    port, = free_ports(1)
    config = _config(tmp_path, "unused", backend="openai")
    config.endpoint.base_url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(BackendError, match=f"cannot reach the endpoint http://127.0.0.1:{port}/v1"):
        sweep.run(config, progress=False)
    assert not (tmp_path / sweep.SETTINGS_FILE).exists()  # nothing recorded that would block the corrected rerun
    assert main(["eval", "--config", str(CONFIG), "--config.backend=openai", f"--config.output_dir={tmp_path / 'b'}",
                 f"--config.endpoint.base_url=http://127.0.0.1:{port}/v1"]) == 2
    assert "error: cannot reach the endpoint" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(CONFIG.parent.glob("*.py")), ids=lambda p: p.name)
def test_every_eval_config_loads(path):
    config = sweep.load_config(path)
    assert config.tasks and config.efforts == ("low", "medium", "high")


def test_a_task_with_the_python_tool_records_its_calls_and_reports_a_tools_column(tmp_path):
    """A custom task asked "+python" of a checkpoint whose greedy output is a python call (`bigram_hf_model`):
    each sample records the calls and the sandbox's answers; the report's row names the tools and counts the calls
    (the model calls again at every turn, so max_turns ends it: truncated, not graded right)."""
    import shutil

    from hf_models import bigram_hf_model

    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed: the python tool's sandbox needs it")
    record = {"messages": [{"role": "user", "content": "What is 6*7?"}], "reasoning_effort": "low",
              "builtin_tools": ["python"]}
    call = harmony.render_message(harmony.Message("assistant", "print(6*7)", "analysis", "python", "code"))
    bigram_hf_model([harmony.encode_chat(record)[-1], *call[0][call[1]:]], num_hidden_layers=2).save_pretrained(
        tmp_path / "ckpt")
    task = tmp_path / "sums.jsonl"
    task.write_text(json.dumps({"prompt": "What is 6*7?", "answer": "42", "grader": "numeric"}) + "\n")
    config = _config(tmp_path / "eval", tmp_path / "ckpt", tasks=(f"{task}+python",), efforts=("low",),
                     max_turns=2)
    result = sweep.run(config, progress=False)
    (sample,) = _samples(tmp_path / "eval")
    assert sample["task"] == "sums+python" and sample["tools"] == ["python"]
    assert sample["tool_calls"] == [{"recipient": "python", "input": "print(6*7)", "output": "42"},
                                    {"recipient": "python", "input": "print(6*7)", "output": None}]
    assert sample["truncated"] and not sample["correct"]
    (row,) = result.summary["results"]
    assert (row["tools"], row["tool_calls_mean"]) == ("python", 2.0)
    assert "| sums+python | low | python | 0.000" in result.report.read_text()
    config.backend, config.endpoint.base_url = "openai", "http://127.0.0.1:1/v1"
    with pytest.raises(ConfigError, match="built-in tools \\(python\\) run with backend 'jax' only"):
        sweep.validate(config)


@pytest.mark.parametrize("override, message", [
    ("--config.tasks=gsm9k", "unknown task 'gsm9k'"),
    ("--config.tasks=gsm8k+browser", "config.browser_docs: tasks with +browser need a folder"),
    ("--config.efforts=low,extreme", "config.efforts: 'extreme'"),
    ("--config.backend=vllm", "config.backend"),
    ("--config.sample=2", "unknown key 'sample'"),
    ("--config.efforts=()", "at least one of each"),
])
def test_bad_settings_are_named(tmp_path, capsys, override, message):
    assert main(["eval", "--config", str(CONFIG), f"--config.output_dir={tmp_path}", override]) == 2
    assert message in capsys.readouterr().err
