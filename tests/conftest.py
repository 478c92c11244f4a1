import fcntl
import os
import shutil
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


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): a worker per core, at most one per 8 GiB of memory (a worker's largest
    tests and the processes they start take a few GiB); two on CI's 2-core, 24 GiB machine."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(os.cpu_count() or 1, memory // (8 << 30)))


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """The model of the README's first command: the tiny demo's fine-tuning config run as shipped (about four
    minutes on two CPU cores, shared by every test that needs a trained model). It writes well-formed harmony
    (analysis, then a final answer), which the server and eval tests need, and counts as the demo promises.
    Trained once per run: of pytest-xdist's workers, the first to need it trains it while the others wait."""
    from gptoss_jax.train.config import load_config
    from gptoss_jax.train.trainer import train

    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent  # each worker's base directory lies in the run's
    with open(shared / "demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = shared / "demo.merged"  # written once the model is exported
        if not merged.exists():
            output = shared / "demo"
            shutil.rmtree(output, ignore_errors=True)  # what a failed attempt left
            config = load_config(Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny_demo.py",
                                 [f"--config.train.output_dir={output}"])
            merged.write_text(str(train(config, progress=False).exports["merged"]))
        return Path(merged.read_text())


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
