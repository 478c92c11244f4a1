"""The README's Python snippets run as written, in order, as a reader runs them one after another: the hub ids
they name are the demo model, their server is a real `gptoss-jax serve` of it (as gpt-oss-20b, with the python
tool), their docs/ folder holds one document."""

import re
import shutil
from pathlib import Path

import pytest

from helpers import serving

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_IDS = re.compile(r'"openai/gpt-oss-(?:20|120)b"')
SERVER = "http://127.0.0.1:8000/v1"


def _snippets() -> list[tuple[int, str]]:
    """(line, code) of every ```python block of the README."""
    text = README.read_text()
    return [(text[: match.start()].count("\n") + 2, match.group(1))
            for match in re.finditer(r"^```python\n(.*?)^```$", text, re.M | re.S)]


def test_every_readme_python_snippet_runs_as_written(demo_model_dir, tmp_path, monkeypatch):
    snippets = _snippets()
    assert len(snippets) >= 9, "the README's Python snippets were not found"
    sandbox = shutil.which("bwrap") is not None  # the python tool's sandbox; .ci/run installs it
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "planets.md").write_text("# The solar system\n\nEight planets orbit the Sun.\n")
    namespace: dict = {}
    ran = []
    with serving(demo_model_dir, "--max-context", "2048", *(("--tools", "python") if sandbox else ()),
                 name="gpt-oss-20b") as url:
        for line, code in snippets:
            if not sandbox and ("PythonTool" in code or "code_interpreter" in code or '"python"' in code):
                continue  # needs bubblewrap; say so below
            code = HUB_IDS.sub(repr(str(demo_model_dir)), code).replace(SERVER, url + "/v1")
            exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own code
            ran.append(line)
    assert namespace["logits"].shape[-1] == 201088
    assert namespace["answers"][0].messages  # the demo model answers in harmony
    assert namespace["result"].messages[-1].text == "4"
    if not sandbox:
        pytest.skip(f"ran the snippets at README.md lines {ran}; the python tool's need bubblewrap (bwrap)")
