"""No code path runs code from a model repository or unpickles arbitrary objects."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "adaptery"


def calls() -> list[tuple[Path, ast.Call]]:
    out = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                out.append((path, node))
    return out


def _name(func: ast.expr) -> str:
    return ast.unparse(func)


def test_nothing_sets_trust_remote_code():
    offenders = [
        f"{path.relative_to(SOURCE.parent)}:{call.lineno}"
        for path, call in calls()
        for keyword in call.keywords
        if keyword.arg == "trust_remote_code"
        and not (isinstance(keyword.value, ast.Constant) and keyword.value.value is False)
    ]
    assert not offenders, f"trust_remote_code other than a literal False: {offenders}"
    text = "\n".join(p.read_text() for p in SOURCE.rglob("*.py"))
    assert "trust_remote_code=True" not in text


def test_every_torch_load_is_weights_only():
    offenders = []
    for path, call in calls():
        if _name(call.func) == "torch.load":
            weights_only = [k for k in call.keywords if k.arg == "weights_only"]
            literal_true = (
                weights_only and isinstance(weights_only[0].value, ast.Constant) and weights_only[0].value.value
            )
            if not literal_true:
                offenders.append(f"{path.relative_to(SOURCE.parent)}:{call.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


def test_torch_load_is_only_called_by_its_full_name():
    """So the check above sees every call: no `from torch import load` aliases."""
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                assert "load" not in {a.name for a in node.names}, path


def test_no_pickle_or_unsafe_deserialisers_are_imported():
    unsafe = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib"}
    offenders = []
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            offenders += [f"{path.relative_to(SOURCE.parent)}: {n}" for n in names if n in unsafe]
    assert not offenders, offenders
