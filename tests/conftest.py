import os
from pathlib import Path

# The offline copies of the o200k vocabulary that CI machines carry next to the checkout (see DESIGN.md §5).
_SHARED = Path(__file__).resolve().parents[2] / "shared"
if _SHARED.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_SHARED / "tiktoken_cache"))
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(_SHARED / "tokenizer"))



import pytest  # noqa: E402

from gptoss_jax import gpu_compile  # noqa: E402
from gptoss_jax.allocator import reuse_freed_memory  # noqa: E402

reuse_freed_memory()  # as the CLI does: CPU steps reuse freed memory instead of page-faulting it in again
# The tests run on the CPU. With the CUDA plugin installed (the test extra brings it, to compile for an H100) and no
# GPU, jax must not try to start it: here, and in the processes the tests start.
if gpu_compile.use_cpu_platform():
    os.environ["JAX_PLATFORMS"] = "cpu"


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """The model of the README's first command: the tiny demo's fine-tuning config run as shipped (about four
    minutes on two CPU cores, shared by every test that needs a trained model). It writes well-formed harmony
    (analysis, then a final answer), which the server and eval tests need, and counts as the demo promises."""
    from gptoss_jax.train.config import load_config
    from gptoss_jax.train.trainer import train

    output = tmp_path_factory.mktemp("demo")
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny_demo.py",
                         [f"--config.train.output_dir={output}"])
    return train(config, progress=False).exports["merged"]


@pytest.fixture(params=["every expert", "routed"])
def expert_path(request, monkeypatch):
    """Both ways a small dense model's few tokens can take: every expert on every token (decode-sized work), or
    routed to their experts (gathered or grouped), as larger work is."""
    import gptoss_jax.moe

    if request.param == "routed":
        monkeypatch.setattr(gptoss_jax.moe, "EVERY_EXPERT_TOKENS", 0)
    else:  # not gathered, as a step of a few pairs an expert would be
        monkeypatch.setattr(gptoss_jax.moe, "GATHERED_PAIRS_PER_EXPERT", 0)
    return request.param
