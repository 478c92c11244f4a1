"""Harmony rendering throughput, ours vs openai-harmony, on one CPU core, in one process.

Ours: record -> tokens + loss mask (`encode_for_training`), then packing into rows.
Theirs: openai-harmony `render_conversation_for_training` on Conversation objects built beforehand (building
them is not timed, which favours it).

Conversations: the 31 parity-test records (tools, tool loops, multi-turn, unicode) and the first 2000 GSM8K
records. Run from the checkout: `python benchmarks/harmony_render.py` (needs the test extra).
"""

import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(SHARED / "tokenizer"))
sys.path.insert(0, str(ROOT / "tests"))

import openai_harmony as oh  # noqa: E402
from timing import seconds  # noqa: E402

from gptoss_jax import harmony  # noqa: E402
from gptoss_jax.train import data, gsm8k  # noqa: E402

from harmony_cases import RECORDS, drop_finished_analysis, reference_conversation  # noqa: E402


def main():
    lines = (SHARED / "data" / "gsm8k" / "train.jsonl").read_text().splitlines()[:2000]
    records = RECORDS * 10 + [gsm8k.gsm8k_record(json.loads(line)) for line in lines]
    encoding = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    config = oh.RenderConversationConfig(auto_drop_analysis=False)
    conversations = [oh.Conversation.from_messages(drop_finished_analysis(reference_conversation(r), True))
                     for r in records]
    harmony.encode_for_training(records[0])  # warm the tokenizer and caches

    theirs = seconds(lambda: [encoding.render_conversation_for_training(c, config=config)
                              for c in conversations], 3)
    ours_render = seconds(lambda: [harmony.encode_for_training(r) for r in records], 3)
    rows = [("r", r) for r in records]
    ours_pipeline = seconds(lambda: data.pack(data.encode_examples(rows), 4096, seed=0), 3)
    tokens = sum(len(harmony.encode_for_training(r)[0]) for r in records)

    lines = [
        f"conversations: {len(records)}, tokens: {tokens}, one core of {platform.processor() or platform.machine()}",
        f"openai-harmony render_conversation_for_training: {len(records) / theirs:9.0f} conversations/s",
        f"ours encode_for_training (render + mask):        {len(records) / ours_render:9.0f} conversations/s"
        f"  ratio ours/theirs {theirs / ours_render:.2f}",
        f"ours render + mask + pack (4096-token rows):     {len(records) / ours_pipeline:9.0f} conversations/s"
        f"  ratio ours/theirs {theirs / ours_pipeline:.2f}",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
