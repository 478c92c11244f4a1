"""The layers of DESIGN.md §3 hold: the package's modules import each other in one direction only, counting every
import (at the top of a file and inside functions: a cycle hidden in a function is still a cycle), train may use
eval but never the reverse, and the core below both uses neither (the command line sits on top of everything)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each part of the installed package lives in the checkout (pyproject.toml's package-dir).
FOLDERS = {"gptoss_jax": ROOT / "gptoss_jax", "gptoss_jax.kernels": ROOT / "kernels",
           "gptoss_jax.train": ROOT / "train", "gptoss_jax.eval": ROOT / "eval"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in FOLDERS.items():
        for file in folder.rglob("*.py"):
            parts = file.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = file
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (`from package import module` counts as an
    import of the module; of a name, as an import of the module defining the package)."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, file in modules.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            graph[name] |= {target for target in targets if target in modules and target != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None."""
    state, path = {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_train_may_use_eval_but_eval_never_train():
    reaching_up = sorted(f"{module} -> {target}" for module, targets in import_graph().items()
                         if module.startswith("gptoss_jax.eval") for target in targets
                         if target.startswith("gptoss_jax.train"))
    assert not reaching_up, reaching_up


def test_the_core_uses_neither_train_nor_eval():
    """Below train and eval: everything but the two of them and the command line, which dispatches to both."""
    above = ("gptoss_jax.train", "gptoss_jax.eval", "gptoss_jax.cli")
    reaching_up = sorted(f"{module} -> {target}" for module, targets in import_graph().items()
                         if not module.startswith(above) for target in targets
                         if target.startswith(above))
    assert not reaching_up, reaching_up


def test_the_graph_sees_imports_inside_functions():
    """The check cannot pass by not looking: the command line's imports are all inside functions."""
    inside = {"gptoss_jax.train.trainer", "gptoss_jax.eval.sweep", "gptoss_jax.server"}
    assert inside <= import_graph()["gptoss_jax.cli"]
