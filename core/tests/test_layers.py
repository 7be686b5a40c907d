"""Layers point down only: core imports neither framework nor what sits above it; neither stack
imports the other or the other's framework: they meet in `crossing` (the weight mapping in NumPy
and both checkpoint readers), which imports neither stack, and which torch_ref imports only
inside functions (for a flax_impl checkpoint, which needs Orbax and JAX)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import testkit

REPO = testkit.REPO
JAX = {"jax", "jaxlib", "flax", "optax", "orbax", "tensorflow", "tensorflow_datasets"}
TORCH = {"torch", "torchvision"}
ABOVE = {
    "configs",
    "torch_ref",
    "flax_impl",
    "crossing",
    "parity_tests",
    "benchmarks",
    "demo",
    "testkit",
}


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level package, line, at module level?) of every import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out += [(n.split(".")[0], node.lineno, id(node) in top_level) for n in names]
    return out


def sources(package: str) -> list[Path]:
    return [p for p in sorted((REPO / package).glob("*.py")) if p.name != "conftest.py"]


@pytest.mark.parametrize(
    "package, banned",
    [
        ("core", JAX | TORCH | ABOVE),
        ("crossing", {"torch_ref", "flax_impl", "configs", "parity_tests", "demo", "testkit"}),
        ("torch_ref", JAX | {"flax_impl"}),
        ("flax_impl", TORCH | {"torch_ref"}),
    ],
)
def test_no_import_points_up_or_across(package, banned):
    bad = [
        f"{p.name}:{line} imports {name}"
        for p in sources(package)
        for name, line, top in imports(p)
        if name in banned
    ]
    assert not bad, bad


def test_torch_ref_reaches_crossing_only_lazily():
    """A torch command loads Orbax and JAX only for a flax_impl checkpoint."""
    bad = [
        f"{p.name}:{line}"
        for p in sources("torch_ref")
        for name, line, top in imports(p)
        if name == "crossing" and top
    ]
    assert not bad, bad


def test_the_checker_sees_a_planted_import(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    import torch.nn as nn\nfrom configs import get_config\n")
    assert sorted(imports(planted)) == [("configs", 3, True), ("torch", 2, False)]


def test_importing_all_of_core_loads_no_framework():
    modules = [p.stem for p in sources("core") if p.stem != "__init__"]
    banned = sorted(JAX | TORCH | ABOVE)
    code = (
        f"import sys; import {', '.join('core.' + m for m in modules)}; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {banned!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def module_graph(
    packages=("core", "crossing", "torch_ref", "flax_impl", "testkit"),
) -> dict[str, set[str]]:
    """Each module of `packages` and the modules of those packages it imports, at module level
    or inside a function (a lazy import is still a dependency a reader must follow)."""
    graph = {}
    for package in packages:
        for p in sources(package):
            name = f"{package}.{p.stem}" if p.stem != "__init__" else package
            deps = set()
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                else:
                    continue
                deps |= {m for m in mods if m.split(".")[0] in packages and m != name}
            graph[name] = deps
    return {m: {d for d in deps if d in graph} for m, deps in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once, from where it closes)."""
    found, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                found.append(path[path.index(d) :] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_cycle():
    """records <-> plot and regularisers <-> sampling were the two cycles: atomic writes are a
    leaf module (core.files), the pictures are one more sink of the driver, and the split of a
    batch among processes is its own leaf (core.shares)."""
    graph = module_graph()
    assert len(graph) > 40  # the packages were found
    assert not cycles(graph), cycles(graph)


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
