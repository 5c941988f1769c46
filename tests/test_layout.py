"""The package order of docs/design.md holds: no import cycles, and no package imports one listed after it."""

from __future__ import annotations

import ast
from pathlib import Path

import curdkv

SRC = Path(curdkv.__file__).parent

# docs/design.md's order; each may import only those before it. The package itself (__init__) and
# __main__ assemble the public API and the command, so they may import anything.
ORDER = ("transformers_compat", "models", "report", "kernels", "selection", "cache", "attention", "presses",
         "runtime", "context", "vllm", "eval", "bench", "analysis", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every curdkv module and the curdkv modules it imports (anywhere in its body, lazily or not)."""
    paths = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            found.update(c for c in candidates if c in paths and c != name)
        graph[name] = found
    return graph


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_no_package_imports_one_listed_after_it():
    graph = _imports()
    wrong = []
    for module, targets in graph.items():
        if _top(module) in ("", "__main__"):
            continue
        assert _top(module) in ORDER, f"{module} is in no package of the design's order; add it there"
        for target in targets:
            if _top(target) and ORDER.index(_top(target)) > ORDER.index(_top(module)):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the design's order:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_a_cycle_and_a_wrong_order(monkeypatch):
    # The walk must notice what it is there to refuse: a fake edge from selection up to runtime.
    real = _imports()
    fake = {m: set(t) for m, t in real.items()}
    fake["curdkv.selection"].add("curdkv.runtime.layer")
    monkeypatch.setattr(__import__(__name__), "_imports", lambda: fake)
    for check in (test_no_package_imports_one_listed_after_it, test_no_import_cycles):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} missed the fake import")
