"""The training data pipeline: reading, rendering with masks, packing, shuffling and host sharding."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

from gptoss_jax import GptOss, GptOssConfig, harmony, synthetic, tokenizer
from gptoss_jax.train import data, gsm8k

from harmony_cases import RECORDS
from helpers import SHARED, needs_shared, relative_error

GSM8K = "data/gsm8k/train.jsonl"


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def test_rows_hold_each_example_with_its_mask_and_nothing_across_segments(tmp_path):
    file = _write_jsonl(tmp_path / "chats.jsonl", RECORDS)
    examples = data.encode_examples(data.read_records(file))
    assert len(examples) == len(RECORDS) and examples[3].where == f"{file}:4"
    rows = data.pack(examples, 1024, seed=3)
    assert rows.inputs.shape == (len(rows), 1024)
    by_tokens = {tuple(e.tokens[:-1]): e for e in examples}
    seen = 0
    for r in range(len(rows)):
        for segment in range(1, rows.segment_ids[r].max() + 1):
            where = rows.segment_ids[r] == segment
            example = by_tokens[tuple(rows.inputs[r, where])]
            np.testing.assert_array_equal(rows.targets[r, where], example.tokens[1:])
            np.testing.assert_array_equal(rows.weights[r, where], example.mask[1:])
            np.testing.assert_array_equal(rows.positions[r, where], np.arange(where.sum()))
            assert np.all(np.diff(np.flatnonzero(where)) == 1)  # contiguous
            seen += 1
        padding = rows.segment_ids[r] == 0
        assert not rows.weights[r, padding].any()
    assert seen == len(examples)


def test_packed_row_logits_equal_each_example_alone():
    """Segment ids and restarted positions keep a packed row's examples from seeing each other."""
    config = GptOssConfig.tiny().replace(num_hidden_layers=3, sliding_window=8)
    model = GptOss(config, dtype="float32", rngs=nnx.Rngs(0))
    examples = data.encode_examples([("a", RECORDS[1]), ("b", RECORDS[4]), ("c", RECORDS[0])])
    rows = data.pack(examples, 400, shuffle="none")
    assert len(rows) == 1 and rows.segment_ids.max() == 3
    packed = np.asarray(model(rows.inputs, positions=rows.positions, segment_ids=rows.segment_ids))
    for segment, example in enumerate(examples, start=1):
        alone = np.asarray(model(example.tokens[None, :-1]))[0]
        assert relative_error(packed[0, rows.segment_ids[0] == segment], alone) <= 1e-5


def test_overlong_examples_are_truncated_or_dropped_and_counted():
    examples = data.encode_examples([(str(i), r) for i, r in enumerate(RECORDS)])
    longest = max(len(e.tokens) for e in examples)
    limit = 200
    overlong = sum(len(e.tokens) - 1 > limit for e in examples)
    assert overlong and longest > limit
    stats = data.DataStats()
    rows = data.pack(examples, limit, overlong="drop", stats=stats)
    assert stats.dropped == overlong and stats.truncated == 0 and stats.examples == len(examples) - overlong
    stats = data.DataStats()
    rows = data.pack(examples, limit, overlong="truncate", stats=stats)
    assert stats.truncated + stats.dropped == overlong and stats.examples == len(examples) - stats.dropped
    assert rows.inputs.shape[1] == limit


def test_shuffle_is_deterministic_and_hosts_get_disjoint_equal_shares():
    records = [{"messages": [{"role": "user", "content": f"Question {i}: " + "why? " * (i % 40)},
                             {"role": "assistant", "thinking": "hmm " * (i % 13), "content": f"Answer {i}"}]}
               for i in range(90)]
    examples = data.encode_examples([(str(i), r) for i, r in enumerate(records)])
    first = data.pack(examples, 300, seed=7)
    np.testing.assert_array_equal(first.inputs, data.pack(examples, 300, seed=7).inputs)
    assert not np.array_equal(first.inputs, data.pack(examples, 300, seed=8).inputs)
    stats = [data.DataStats() for _ in range(3)]
    shares = [data.pack(examples, 300, seed=7, process_index=i, process_count=3, stats=stats[i]) for i in range(3)]
    assert len({len(share) for share in shares}) == 1
    assert sum(len(share) for share in shares) + stats[0].rows_left_over == len(first)
    rows = [tuple(row) for share in shares for row in share.inputs]
    assert len(set(rows)) == len(rows)
    np.testing.assert_array_equal(shares[1].inputs, first.inputs[1::3][: len(shares[1])])


def test_bad_rows_name_file_and_line(tmp_path):
    file = tmp_path / "chats.jsonl"
    file.write_text(json.dumps(RECORDS[0]) + "\n" + "{not json\n" + json.dumps({"messages": [{"role": "bot"}]}) + "\n")
    with pytest.raises(data.DataError, match=rf"^{file}:2: not JSON"):
        data.encode_examples(data.read_records(file))
    stats = data.DataStats()
    assert len(data.encode_examples(data.read_records(file), skip_invalid=True, stats=stats)) == 1
    assert (stats.records, stats.invalid) == (3, 2)
    file.write_text(json.dumps({"messages": [{"role": "bot"}]}) + "\n")
    with pytest.raises(data.DataError, match=rf"^{file}:1: messages\[0\]\.role: expected one of"):
        data.encode_examples(data.read_records(file))
    with pytest.raises(data.DataError, match="no such file or directory"):
        list(data.read_records(tmp_path / "missing.jsonl"))


def _write_parquet_dataset(root: Path) -> Path:
    """The layout of an HF dataset repo: data/train-*.parquet, messages with null fields, extra columns."""
    (root / "data").mkdir(parents=True)
    rows = [{"reasoning_language": "French", "messages": [
        {"role": "system", "content": "reasoning language: French", "thinking": None},
        {"role": "user", "content": f"Question {i}?", "thinking": None},
        {"role": "assistant", "content": f"Réponse {i}.", "thinking": f"Je réfléchis {i}."}]} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), root / "data" / "test-00000-of-00001.parquet")
    return root


def test_trl_dataset_formats_map_to_harmony_and_records_load_from_memory(tmp_path):
    """TRL's SFTTrainer formats: prompt-completion (texts: a user message and the assistant's final answer; message
    lists: the conversation, only the completion trained, TRL's completion-only loss) renders exactly as the
    equivalent messages record; a text record is its raw tokens plus <|return|>, all trained. A list of records and
    a datasets.Dataset load as the same records written to JSONL do; a record of no known form is one message."""
    datasets = pytest.importorskip("datasets")
    answer = {"role": "assistant", "thinking": "Two and two.", "content": "4"}
    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    cases = [
        ({"prompt": "What is 2+2?", "completion": "4", "reasoning_effort": "low"},
         {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
          "reasoning_effort": "low"}),
        ({"prompt": [*earlier, {"role": "user", "content": "2+2?"}], "completion": [answer]},
         {"messages": [*earlier, {"role": "user", "content": "2+2?"}, answer]}),
    ]
    for trl, ours in cases:
        (mine,), (expected,) = data.encode_examples([("a", trl)]), data.encode_examples([("b", ours)])
        np.testing.assert_array_equal(mine.tokens, expected.tokens)
        np.testing.assert_array_equal(mine.mask, expected.mask)
    trained = tokenizer.get_encoding().decode(mine.tokens[mine.mask].tolist())
    assert "Hello!" not in trained and "Two and two." in trained  # the earlier turn is prompt, not trained
    text = "Once upon a time<|endoftext|> there"
    (raw,) = data.encode_examples([("c", {"text": text})])
    assert raw.tokens.tolist() == tokenizer.get_encoding().encode(text, allowed_special="all") + [tokenizer.RETURN]
    assert raw.mask.all()
    records = [trl for trl, _ in cases] + [{"text": text}] + RECORDS[:3]
    from_file, _ = data.load_rows(_write_jsonl(tmp_path / "mixed.jsonl", records), 512, seed=1)
    rows, stats = data.load_rows(records, 512, seed=1)
    assert stats.examples == len(records)
    np.testing.assert_array_equal(rows.inputs, from_file.inputs)
    np.testing.assert_array_equal(rows.weights, from_file.weights)
    pairs = [{"prompt": f"What is {n}+{n}?", "completion": str(2 * n)} for n in range(5)]
    from_list, _ = data.load_rows(pairs, 256, seed=1)
    from_dataset, _ = data.load_rows(datasets.Dataset.from_list(pairs), 256, seed=1)
    np.testing.assert_array_equal(from_dataset.inputs, from_list.inputs)
    np.testing.assert_array_equal(from_dataset.weights, from_list.weights)
    with pytest.raises(data.DataError, match=r"record 2: a record has 'messages' \(a conversation\), 'prompt' and "
                                             r"'completion', or 'text'; this one has \['question'\]"):
        data.load_rows([records[0], {"question": "q"}], 512)
    with pytest.raises(data.DataError, match=r"record 1: completion: expected a text or a non-empty list"):
        data.load_rows([{"prompt": "q", "completion": 5}], 512)


def test_parquet_dataset_directory(tmp_path):
    root = _write_parquet_dataset(tmp_path / "dataset")
    rows, stats = data.load_rows(root, 256, seed=0)
    assert stats.records == 5 and stats.examples == 5
    text = tokenizer.get_encoding().decode(rows.inputs[0].tolist())
    assert "reasoning language: French" in text and "Je réfléchis" in text


def test_hf_dataset_id_from_the_cache_offline(tmp_path):
    root = _write_parquet_dataset(tmp_path / "dataset")
    repo = tmp_path / "hub" / "datasets--someone--thinking"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("1" * 40)
    shutil.copytree(root, repo / "snapshots" / ("1" * 40))
    code = ("from gptoss_jax.train import data; rows, stats = data.load_rows('someone/thinking', 256); "
            "print(stats.records, stats.examples)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["5", "5"], result.stderr[-2000:]


@needs_shared(GSM8K)
def test_gsm8k_records(tmp_path):
    lines = (SHARED / GSM8K).read_text().splitlines()[:50]
    source = tmp_path / "gsm8k.jsonl"
    source.write_text("\n".join(lines) + "\n")
    assert gsm8k.convert(source, tmp_path / "out.jsonl") == 50
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    first = records[0]["messages"]
    assert first[1] == {"role": "assistant", "content": "72",
                        "thinking": "Natalia sold 48/2 = 24 clips in May.\n"
                                    "Natalia sold 48+24 = 72 clips altogether in April and May."}
    assert all("<<" not in r["messages"][1]["thinking"] for r in records)
    examples = data.encode_examples(data.read_records(tmp_path / "out.jsonl"))
    assert len(examples) == 50
    source.write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(ValueError, match=rf"{source}:1: not a GSM8K row"):
        gsm8k.convert(source, tmp_path / "bad.jsonl")


def test_the_gsm8k_converter_names_a_missing_file_or_a_bad_row_in_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert gsm8k.main([str(missing), str(tmp_path / "out.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: {missing}: No such file or directory\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q"}\n'.replace('"a"', '"#### 4"'))
    assert gsm8k.main([str(bad), str(tmp_path / "out.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: {bad}:2: not a GSM8K row ('answer')\n"


def test_synthetic_counts_restart_at_every_x_and_each_letter_is_copied_from_the_same_distance():
    """The demo's task: the answer is the number of r's after the last x (checked against a regular expression),
    every written count is the count so far — after every letter at high effort, every fourth at medium — each
    effort's analysis starts with its own token, and each letter is copied from the question 31 tokens back
    (within the tiny model's 32-token window). Packed in order into 640-token rows, every row holds one round of
    efforts: low once, medium and high twice."""
    encoding = tokenizer.get_encoding()
    records = synthetic.counting_records(100, seed=3)
    assert [r["reasoning_effort"] for r in records[:5]] == ["low", "medium", "high", "medium", "high"]
    assert len({r["answer"] for r in records}) >= 6  # answers spread over many counts, not one guessable value
    firsts = set()
    for record in records:
        question, reply = record["messages"]
        letters = re.search(r": (.*)\.$", question["content"]).group(1).split(", ")
        assert len(letters) == synthetic.LETTERS and record["answer"] == reply["content"]
        assert int(record["answer"]) == len(re.findall("r", "".join(letters).rsplit("x", 1)[-1]))
        tokens, mask = harmony.encode_for_training(record)
        analysis_at = mask.index(True) + 3  # the first token after <|channel|>analysis<|message|>
        firsts.add((record["reasoning_effort"], tokens[analysis_at]))
        if record["reasoning_effort"] == "low":
            assert reply["thinking"] == f"Answer: {record['answer']}."
            continue
        every = {"medium": 4, "high": 1}[record["reasoning_effort"]]
        written = re.findall(r"([a-z])(\d+|,)", reply["thinking"].split(": ", 1)[1])
        assert [letter for letter, _ in written] == letters
        assert [(seen, int(n)) for seen, (_, n) in enumerate(written, start=1) if n != ","] == [
            (seen, synthetic.count(letters[:seen])) for seen in range(1, len(letters) + 1)
            if seen % every == 0 or seen == len(letters)]
        copies = range(analysis_at + 2, analysis_at + 2 + 2 * len(letters), 2)  # after the header and ':'
        assert [encoding.decode([tokens[i]]) for i in copies] == [f" {letter}" for letter in letters]
        # predicted at position i - 1, which finds the letter 31 positions back: inside the 32-key window
        assert all(tokens[i - 32] == tokens[i] for i in copies)
    assert len({token for _, token in firsts}) == len(firsts) == 3  # one first token per effort, none shared
    rows = data.pack(data.encode_examples((f"record {i}", r) for i, r in enumerate(records)), 640,
                     shuffle="rows", seed=0)
    assert len(rows) == len(records) // len(synthetic.CYCLE)
    for row in range(len(rows)):
        texts = [encoding.decode(rows.inputs[row][rows.segment_ids[row] == s].tolist()) for s in range(1, 6)]
        assert [text.split("Reasoning: ")[1].split("\n")[0] for text in texts] == list(synthetic.CYCLE)
