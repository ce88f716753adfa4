"""The package's import structure: no module imports back into one that imports it, and each imports on its own.

The graph is read from the sources with ast, so it counts every import: at the top, inside functions
(imported late, still a dependency) and under `if TYPE_CHECKING:`. A cycle that only works because
one side imports late is still a cycle: it breaks as soon as someone moves that import up.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import vicunaflow

PACKAGE_DIR = Path(vicunaflow.__file__).parent

# Cycles in packages other engineers own, reported to the lead: tolerated until they are untangled,
# never grown (a cycle that is not a subset of one of these fails). Remove an entry once it is gone.
KNOWN_CYCLES: tuple[set[str], ...] = ()

# What must import without torch: the CLI table, `finetune --help`, the workflow's common.smk, report.
TORCH_FREE = ("vicunaflow.cli", "vicunaflow.finetune", "vicunaflow.finetune.config", "vicunaflow.report")


def modules() -> dict[str, Path]:
    """Every module of src/vicunaflow by dotted name (a package by its own name, from its __init__.py)."""
    found = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the vicunaflow modules it imports anywhere in its source."""
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {_owner(alias.name, known) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from .x import y
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join([*base, node.module] if node.module else base)
                else:
                    source = node.module or ""
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    submodule = f"{source}.{alias.name}"
                    targets.add(submodule if submodule in known else _owner(source, known))
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def _owner(dotted: str, known: dict[str, Path]) -> str:
    while dotted and dotted not in known:
        dotted = dotted.rpartition(".")[0]
    return dotted


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
    return found


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_late_relative_and_type_checking_imports() -> None:
    graph = import_graph()
    assert "vicunaflow.finetune.loop" in graph["vicunaflow.finetune"]  # imported inside setup()
    assert {"vicunaflow.finetune.config", "vicunaflow.finetune.state"} <= graph["vicunaflow.finetune.loop"]
    assert "vicunaflow.cli" not in graph["vicunaflow.finetune"]


def test_no_import_cycles_in_src() -> None:
    found = cycles(import_graph())
    new = [sorted(c) for c in found if not any(c <= known for known in KNOWN_CYCLES)]
    assert not new, f"import cycles (move what both sides need into a module both import): {new}"


def test_every_module_imports_on_its_own() -> None:
    """Each module in a fresh set of vicunaflow modules (torch and others stay loaded, for speed); some without torch.

    `__main__` is left out: importing it runs the CLI.
    """
    names = sorted(name for name in modules() if not name.endswith(".__main__"))
    script = f"""
import importlib, sys, traceback
for name in {TORCH_FREE!r}:
    importlib.import_module(name)
    assert "torch" not in sys.modules, name + " imports torch"
failed = []
for name in {names!r}:
    for loaded in [m for m in sys.modules if m == "vicunaflow" or m.startswith("vicunaflow.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=-3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_no_module_imports_another_modules_private_names() -> None:
    """A sibling's `_helper` is not an API: what another module needs gets a public, typed name."""
    private = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vicunaflow"):
                private += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not [p for p in private if not p.endswith("__")], private
