"""Layers point down only: framework_free imports neither framework nor what sits above it;
the stacks cross only through the weight conversion, lazily: flax_impl imports torch only in
`flax_impl.convert`, and torch_ref imports JAX only through `flax_impl.convert` (to read the other
stack's checkpoints), inside functions."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JAX = {"jax", "jaxlib", "flax", "optax", "orbax", "tensorflow", "tensorflow_datasets"}
TORCH = {"torch", "torchvision"}
ABOVE = {"configs", "torch_ref", "flax_impl", "parity_tests", "benchmarks", "demo"}


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


@pytest.mark.parametrize("package, banned", [("framework_free", JAX | TORCH | ABOVE),
                                             ("torch_ref", JAX | {"flax_impl"}),
                                             ("flax_impl", {"torch_ref"})])
def test_no_import_points_up_or_across(package, banned):
    def allowed(p: Path, name: str, line: int, top: bool) -> bool:
        text = p.read_text().splitlines()[line - 1].strip()
        return (package == "torch_ref" and name == "flax_impl" and not top
                and text == "from flax_impl import convert")

    bad = [f"{p.name}:{line} imports {name}" for p in sources(package)
           for name, line, top in imports(p) if name in banned and not allowed(p, name, line, top)]
    assert not bad, bad


def test_flax_impl_imports_torch_only_in_convert_and_only_lazily():
    bad = [f"{p.name}:{line}" for p in sources("flax_impl") for name, line, top in imports(p)
           if name in TORCH and (p.name != "convert.py" or top)]
    assert not bad, bad


def test_the_checker_sees_a_planted_import(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    import torch.nn as nn\nfrom configs import get_config\n")
    assert sorted(imports(planted)) == [("configs", 3, True), ("torch", 2, False)]


def test_importing_all_of_framework_free_loads_no_framework():
    modules = [p.stem for p in sources("framework_free") if p.stem != "__init__"]
    banned = sorted(JAX | TORCH | ABOVE)
    code = (f"import sys; import {', '.join('framework_free.' + m for m in modules)}; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {banned!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
