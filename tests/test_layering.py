"""The house's rules, checked on the code itself: six wings under a thin CLI with imports only downward
(core <- labels, models <- data <- training <- inference <- cli), no import circle between any two modules
(function-level imports included), a few imports that must stay light, and no function over 80 lines."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module, forbidden", [
    ("pixelseg.inference.loading", ["pixelseg.inference.predict", "pixelseg.inference.export", "pixelseg.training.train"]),
    ("pixelseg.inference.export", ["pixelseg.inference.predict", "pixelseg.training.train"]),
    ("pixelseg.inference.predict", ["pixelseg.inference.export", "pixelseg.training.train"]),
    ("pixelseg.training.config", ["torch"]),
    ("pixelseg.data", ["pixelseg.training.config"]),  # config -> data (registries) only; sizes is below both
    ("pixelseg.core.sizes", ["torch", "pixelseg.training.config", "pixelseg.data"]),
])
def test_import_does_not_pull_in(module, forbidden):
    code = f"import sys, {module}; print(' '.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} imported {out.stdout.strip()}"


# ---- wings and circles -------------------------------------------------------------------------------
# A wing may import its own modules and any wing of a lower floor. labels and models share a floor and do not
# import each other; data reads the label formats (labels) but no model; training builds models from data;
# inference opens what training wrote (and the Label Studio backend retrains through the trainer).
FLOORS = {"core": 0, "labels": 1, "models": 1, "data": 2, "training": 3, "inference": 4, "cli": 5}
PACKAGE = ROOT / "pixelseg"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Every pixelseg module `name` imports, at module level or inside functions (`from . import x` resolves to
    the module x where it is one)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("pixelseg"):
                module = node.module
            else:
                continue
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("pixelseg")]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _wing(module: str) -> str:
    parts = module.split(".")
    if module == "pixelseg._version":
        return "core"  # the version alone, readable from every floor
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FLOORS) else "cli"


def test_every_module_belongs_to_a_wing():
    flat = sorted(m for m in _modules() if _wing(m) == "cli" and m not in (
        "pixelseg", "pixelseg.cli", "pixelseg.__main__"))
    assert not flat, f"modules outside the six wings (put them in one): {flat}"


def test_imports_only_go_down():
    up = [f"{a} -> {b}" for a, deps in _graph().items() for b in deps
          if _wing(a) != _wing(b) and FLOORS[_wing(b)] >= FLOORS[_wing(a)]]
    assert not up, "imports that go up a floor or across one: " + "; ".join(sorted(up))


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    circles = _circles(_graph())
    assert not circles, f"import circles: {circles}"


def test_the_checks_see_circles_and_upward_imports():
    """The checker itself: a made-up graph with a circle and an arrow up is caught."""
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = _graph()
    assert "pixelseg.core.files" in graph["pixelseg.core.checkpoint"]  # module-level import seen
    assert "pixelseg.inference.runner" in graph["pixelseg.inference.serving"]  # function-level import seen
    assert _wing("pixelseg.core.files") == "core" and _wing("pixelseg.cli") == "cli"


MAX_FUNCTION_LINES = 80


def test_no_function_is_over_80_lines():
    long = []
    for path in sorted((ROOT / "pixelseg").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines} lines")
    assert not long, "functions over 80 lines: " + "; ".join(long)
