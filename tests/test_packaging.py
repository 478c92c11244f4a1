"""An editable install and a built wheel both import gptoss_jax and its kernels/train/eval subpackages.

Each install goes into its own fresh virtual environment that borrows this environment's dependencies through a
.pth file, so only the project itself is installed (offline, no build isolation).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = (
    "import gptoss_jax, gptoss_jax.kernels, gptoss_jax.train, gptoss_jax.eval, gptoss_jax.model; "
    "print(gptoss_jax.__file__); print(gptoss_jax.kernels.__file__)"
)


def _fresh_venv(path: Path) -> Path:
    venv.create(path, with_pip=False)
    python = path / "bin" / "python"
    site = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    (Path(site.decode().strip()) / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _pip(python: Path, *args: str) -> None:
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", *args],
                   check=True, capture_output=True, cwd=ROOT)


def _imported_from(python: Path, cwd: Path) -> list[str]:
    result = subprocess.run([python, "-c", IMPORTS], check=True, capture_output=True, text=True, cwd=cwd)
    return result.stdout.split()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX venv layout")
def test_built_wheel_installs_the_namespace(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing behind in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "build", "dist"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
                    source], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("gptoss_jax-*.whl")
    python = _fresh_venv(tmp_path / "venv")
    _pip(python, str(wheel))
    package, kernels = _imported_from(python, tmp_path)
    assert "site-packages/gptoss_jax/" in package and kernels.endswith("site-packages/gptoss_jax/kernels/__init__.py")
    installed = Path(package).parents[1]
    assert not (installed / "train").exists() and not (installed / "eval").exists()
    assert {p.name for p in (installed / "gptoss_jax" / "targets").iterdir()} >= {"h100.txtpb", "h200.txtpb"}
    assert (tmp_path / "venv" / "bin" / "gptoss-jax").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX venv layout")
def test_editable_install_maps_the_top_level_folders(tmp_path):
    python = _fresh_venv(tmp_path / "venv")
    _pip(python, "-e", str(ROOT))
    package, kernels = _imported_from(python, tmp_path)
    assert package == str(ROOT / "gptoss_jax" / "__init__.py")
    assert kernels == str(ROOT / "kernels" / "__init__.py")


def test_help_works_offline_without_a_cached_tokenizer(tmp_path):
    """`gptoss-jax --help` names every command without the o200k vocabulary at hand (it used to load it while
    importing the agent module, and exit 1 offline)."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TIKTOKEN_")}
    environment.update(TIKTOKEN_CACHE_DIR=str(tmp_path), HTTPS_PROXY="http://127.0.0.1:9",
                       HTTP_PROXY="http://127.0.0.1:9")  # nothing listens on port 9: any download fails at once
    result = subprocess.run([sys.executable, "-m", "gptoss_jax.cli", "--help"], capture_output=True, text=True,
                            env=environment, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(command in result.stdout for command in ("train", "eval", "serve", "generate", "chat", "plan"))
    assert not list(tmp_path.iterdir())  # nothing was downloaded or cached


def test_the_cli_starts_where_no_jax_plugin_is_installed():
    """README command 1 installs no CUDA plugin, so no `jax_plugins` package exists at all: asking whether the
    plugin is there must say no, not fail (it once stopped every command)."""
    code = ("import sys; sys.modules['jax_plugins'] = None\n"  # as if no plugin package were installed
            "from gptoss_jax import gpu_compile\n"
            "assert not gpu_compile.cuda_plugin_installed() and not gpu_compile.use_cpu_platform()\n"
            "from gptoss_jax.cli import main\n"
            "sys.exit(main(['inspect', '--preset', 'gpt-oss-20b']))")
    environment = {key: value for key, value in os.environ.items() if key != "JAX_PLATFORMS"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "20.91B" in result.stdout
