"""The package layering of docs/architecture.md ("Layers"), checked on every module's imports.

Each import (module level, inside functions, ``importlib.import_module("literal")``) of a
project package must name the module's own package or a package of a lower layer.
The table is read from the document, so the rule is stated once.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
CORE = ("policy", "actors", "reward_service", "learner")
# (module, imported module) still tolerated: the rollout actor reads the algorithm names from the
# config; issue 18's algorithm registry (branch issue18-algos) removes this import. Delete the
# entry once it has landed; nothing else may be added here.
PENDING: set = set()


def layers() -> dict[str, int]:
    """{package: layer} from the fenced table after '## Layers'."""
    text = ARCHITECTURE.read_text()
    section = text[text.index("## Layers"):]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    table = {}
    for line in block.splitlines()[1:]:  # the first line is the header
        level, *packages = line.split()
        for package in packages:
            table[package] = int(level)
    return table


def project_packages() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir()
                  if (p / "__init__.py").is_file() and p.name != "tests" and not p.name.startswith("."))


def modules() -> list[Path]:
    return sorted(path for package in project_packages() for path in (ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, wherever it is."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.append((node.lineno, name))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
                   or isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))):
            found.append((node.lineno, node.args[0].value))
    return found


def violations() -> list[str]:
    table = layers()
    problems = []
    for path in modules():
        own = module_name(path).split(".")[0]
        for line, name in imported_names(path):
            target = name.split(".")[0]
            if target == own or target not in table:
                continue  # its own package, or not a project package (torch, ray, ...)
            if table[target] >= table[own] and (module_name(path), name) not in PENDING:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {own} (layer {table[own]}) imports {name} "
                                f"(layer {table[target]})")
    return problems


def test_every_package_has_a_layer():
    missing = [p for p in project_packages() if p not in layers()]
    assert not missing, f"packages in no layer of docs/architecture.md's Layers table: {missing}"


def test_no_module_imports_a_layer_above_or_beside_it():
    problems = violations()
    assert not problems, "imports against docs/architecture.md's layering:\n" + "\n".join(problems)


def test_the_core_never_imports_minicarve():
    hits = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in modules()
            if module_name(path).split(".")[0] in CORE
            for line, name in imported_names(path) if name.split(".")[0] == "minicarve"]
    assert not hits, hits


def test_the_checker_sees_lazy_relative_and_importlib_imports(tmp_path, monkeypatch):
    source = tmp_path / "learner" / "sub"
    source.mkdir(parents=True)
    (source / "mod.py").write_text(
        "import importlib\n"
        "def f():\n    from minicarve.lrm import LRMReconstructor\n"
        "def g():\n    return importlib.import_module('experiments.run')\n"
        "from .. import config\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert sorted(imported_names(source / "mod.py")) == [
        (1, "importlib"), (3, "minicarve.lrm"), (5, "experiments.run"), (6, "learner")]


@pytest.mark.parametrize("registry, name", [
    ("reward_service.reconstructors:RECONSTRUCTORS", "lrm"),
    ("reward_service.rewards:ALIGNMENTS", "minicarve"),
    ("learner.evaluate:VIEW_SOURCES", "ground-truth"),
])
def test_minicarve_names_come_from_its_plugin(registry, name):
    """The default names resolve through the registries once run.plugins' module is loaded."""
    from learner.config import Config
    from plugins import load_plugins

    load_plugins(Config().run.plugins)
    table = getattr(__import__(registry.split(":")[0], fromlist=["_"]), registry.split(":")[1])
    assert name in table and table.get(name).__module__.startswith("minicarve.")
