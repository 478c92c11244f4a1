import os
from pathlib import Path

# The offline copies of the o200k vocabulary that CI machines carry next to the checkout (see DESIGN.md §5).
_SHARED = Path(__file__).resolve().parents[2] / "shared"
if _SHARED.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_SHARED / "tiktoken_cache"))
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(_SHARED / "tokenizer"))



import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """The tiny demo model after a short run of its fine-tuning config: it writes well-formed harmony (analysis,
    then a final answer) — what the server and eval tests need from a model. About a minute on a CPU."""
    from gptoss_jax.train.config import load_config
    from gptoss_jax.train.trainer import train

    output = tmp_path_factory.mktemp("demo")
    overrides = {"train.steps": 70, "data.synthetic.num_train": 600, "data.eval": "", "train.checkpoint_every": 1000,
                 "optimizer.warmup_steps": 5, "train.output_dir": output}
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny_demo.py",
                         [f"--config.{key}={value}" for key, value in overrides.items()])
    return train(config, progress=False).exports["merged"]
