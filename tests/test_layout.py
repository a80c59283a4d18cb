"""The package's folders are its architecture: imports run one way, from the apps down to the models.

Every module's imports of gpt2gen (relative or absolute, at the top or inside a function) are read
from its syntax tree and must reach only its own layer or a lower one; a wrong twin (a model module
that imports the decoding loop) is caught by the same check.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gpt2gen"
LAYERS = ["", "models", "constrained", "decoding", "serving", "study", "apps"]  # "": the root's utilities (files, progress)


def layer_of(module: str) -> str:
    """The layer of a dotted module name inside gpt2gen ("decoding.sampling" -> "decoding", "files" -> "")."""
    head = module.split(".")[0]
    return head if head in LAYERS else ""


def imported(path: Path, source: str | None = None) -> list[str]:
    """The gpt2gen modules a file imports, as dotted names relative to the package."""
    folder = path.parent.relative_to(PACKAGE).parts
    found = []
    for node in ast.walk(ast.parse(source if source is not None else path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(folder[: len(folder) - (node.level - 1)]) if node.level > 1 else list(folder)
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("gpt2gen"):
                target = node.module.removeprefix("gpt2gen").lstrip(".")
            else:
                continue
            if node.module is None or not target:
                found += [f"{target}.{alias.name}".lstrip(".") for alias in node.names]
            else:
                found.append(target)
        elif isinstance(node, ast.Import):
            found += [a.name.removeprefix("gpt2gen.") for a in node.names if a.name.startswith("gpt2gen.")]
    return found


def violations(path: Path, source: str | None = None) -> list[str]:
    own = LAYERS.index(layer_of(".".join(path.relative_to(PACKAGE).with_suffix("").parts)))
    return [f"{path.relative_to(PACKAGE)} imports {name}" for name in imported(path, source)
            if LAYERS.index(layer_of(name)) > own]


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_module_sits_in_a_layer():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "files", "progress")]
    assert loose == []
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == {*LAYERS[1:], "data"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    assert violations(path) == []


def test_the_check_catches_an_import_upwards():
    """A wrong twin: the loading module importing the decoding loop, relatively and absolutely."""
    loading = PACKAGE / "models" / "loading.py"
    assert violations(loading, "from ..decoding.generation import generate\n") == \
        ["models/loading.py imports decoding.generation"]
    assert violations(loading, "def f():\n    from gpt2gen.apps import cli\n") == ["models/loading.py imports apps"]
    assert violations(loading, "from ..files import cache_root\nfrom . import embedded\n") == []
