"""What the code needs is declared, and what configures it is read in one place (settings.py)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in {"ImportError", "ModuleNotFoundError"} for n in names)


def third_party_imports(source: Path) -> dict[str, tuple[str, bool]]:
    """Top-level name -> (where first seen, optional): optional when every import of it sits in a `try` that
    catches ImportError."""
    found: dict[str, tuple[str, bool]] = {}
    for path in sorted(source.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        guarded: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
                guarded |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module.split(".")[0]]
            else:
                continue
            for name in names:
                if name in sys.stdlib_module_names or name == source.name or name == "__future__":
                    continue
                where, optional = found.get(name, (f"{path.relative_to(source.parent)}:{node.lineno}", True))
                found[name] = (where, optional and id(node) in guarded)
    return found


def undeclared(source: Path, pyproject: dict) -> list[str]:
    project = pyproject["project"]
    required = {_canonical(Requirement(r).name) for r in project["dependencies"]}
    extras = {_canonical(Requirement(r).name) for group in project.get("optional-dependencies", {}).values()
              for r in group}  # fmt: skip
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for name, (where, optional) in sorted(third_party_imports(source).items()):
        # an optional extra need not be installed here; then its import name stands for its distribution
        candidates = {_canonical(d) for d in distributions.get(name, [])} or {_canonical(name)}
        declared = required | extras if optional else required
        if not candidates & declared:
            kind = "an optional dependency" if optional else "a dependency"
            problems.append(f"{where}: `import {name}` ({', '.join(sorted(candidates))}) is not {kind} in pyproject")
    return problems


def test_every_third_party_import_is_a_declared_dependency():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    problems = undeclared(ROOT / "adaptery", pyproject)
    assert not problems, "\n".join(problems)


def test_the_dependency_check_fails_on_an_undeclared_import(tmp_path):
    source = tmp_path / "adaptery"
    source.mkdir()
    (source / "a.py").write_text(
        "import numpy\ndef f():\n    from torch import nn\ntry:\n    import torchao\nexcept ImportError:\n    pass\n"
    )
    (source / "b.py").write_text("try:\n    import yaml\nexcept ImportError:\n    yaml = None\n")
    pyproject = {"project": {"dependencies": ["torch==2"], "optional-dependencies": {"int8": ["torchao"]}}}
    assert undeclared(source, pyproject) == [
        "adaptery/a.py:1: `import numpy` (numpy) is not a dependency in pyproject",
        "adaptery/b.py:2: `import yaml` (pyyaml) is not an optional dependency in pyproject",
    ]


# Reading the environment outside settings.py: os.environ.get(X), os.environ[X], os.getenv(X), X in os.environ.
def environment_reads(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    constants = {
        target.id: node.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }

    def text(node: ast.expr) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return constants.get(node.id) if isinstance(node, ast.Name) else None

    def is_environ(node: ast.expr) -> bool:
        return ast.unparse(node) in {"os.environ", "environ"}

    reads = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if ast.unparse(func) in {"os.getenv", "getenv"} or (
                isinstance(func, ast.Attribute) and func.attr in {"get", "pop"} and is_environ(func.value)
            ):
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and is_environ(node.value):
            key = node.slice
        elif isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
            key = node.left
        name = text(key) if key is not None else None
        if name and name.startswith("ADAPTERY_"):
            reads.append((node.lineno, name))
    return sorted(reads)


def test_adaptery_settings_are_read_only_in_settings_py():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} reads {name}"
        for path in sorted((ROOT / "adaptery").rglob("*.py"))
        if path != ROOT / "adaptery" / "settings.py"
        for line, name in environment_reads(path)
    ]
    assert not offenders, "read these through adaptery.settings instead:\n" + "\n".join(offenders)


def test_the_settings_check_sees_every_way_of_reading_the_environment(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "import os\nfrom os import environ\nKEY = 'ADAPTERY_KEY'\n"
        "a = os.environ.get('ADAPTERY_A')\nb = os.environ['ADAPTERY_B']\nc = os.getenv(KEY)\n"
        "d = 'ADAPTERY_D' in os.environ\ne = environ.get('ADAPTERY_E', '1')\n"
        "os.environ['ADAPTERY_SET'] = '1'\nf = os.environ.get('HOME')\nenv = {**os.environ, 'ADAPTERY_CHILD': '1'}\n"
    )
    assert environment_reads(module) == [
        (4, "ADAPTERY_A"), (5, "ADAPTERY_B"), (6, "ADAPTERY_KEY"), (7, "ADAPTERY_D"), (8, "ADAPTERY_E")
    ]  # fmt: skip
