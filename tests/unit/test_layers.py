"""Dependencies point downward: the libraries (engine, training, data) and the agent know nothing of HTTP, the
database or the control plane (ARCHITECTURE.md, "Package layout"). Every import counts, a function's too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOWER = ("engine", "training", "data", "agent")
UPPER = ("adaptery.db", "adaptery.services", "adaptery.api", "adaptery.cli", "adaptery.platform")
# What agents may take from messaging: the wire protocol. The rest (NATS server launch, credentials, the control
# plane's responder) is server side and uses the database.
MESSAGING_FOR_AGENTS = ("adaptery.messaging.protocol", "adaptery.messaging.credentials", "adaptery.messaging.identity")


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in `path`, relative ones resolved; `from a import b` also yields a.b
    (b may be a module)."""
    package = list(path.relative_to(root).parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def reaches(prefixes: tuple[str, ...], allowed: tuple[str, ...] = (), root: Path = ROOT) -> list[str]:
    offenders = []
    for layer in LOWER:
        for path in sorted((root / "adaptery" / layer).rglob("*.py")):
            for line, module in imported_modules(path, root):
                # an allowed module, a name in it, or a package on its way (`from adaptery.messaging import protocol`)
                if any(module.startswith(a + ".") or a == module or a.startswith(module + ".") for a in allowed):
                    continue
                if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
                    offenders.append(f"{path.relative_to(root)}:{line} imports {module}")
    return offenders


def test_the_check_sees_relative_and_function_level_imports(tmp_path):
    module = tmp_path / "adaptery" / "engine" / "x.py"
    module.parent.mkdir(parents=True)
    module.write_text("def f():\n    from ..services import queue\n    import adaptery.db.models\n")
    assert reaches(UPPER, root=tmp_path) == [
        "adaptery/engine/x.py:2 imports adaptery.services",
        "adaptery/engine/x.py:2 imports adaptery.services.queue",
        "adaptery/engine/x.py:3 imports adaptery.db.models",
    ]
    agent = tmp_path / "adaptery" / "agent" / "y.py"
    agent.parent.mkdir(parents=True)
    agent.write_text("from adaptery.messaging import protocol, server\nfrom adaptery.messaging.protocol import A\n")
    assert reaches(("adaptery.messaging",), allowed=MESSAGING_FOR_AGENTS, root=tmp_path) == [
        "adaptery/agent/y.py:1 imports adaptery.messaging.server"
    ]


def test_libraries_and_the_agent_do_not_reach_http_the_database_or_the_services():
    assert not reaches(UPPER), "\n".join(reaches(UPPER))


def test_the_agent_takes_only_the_wire_protocol_from_messaging():
    offenders = reaches(("adaptery.messaging",), allowed=MESSAGING_FOR_AGENTS)
    assert not offenders, "\n".join(offenders)


def test_messaging_is_the_wire_and_the_broker_only():
    """The control plane's responder and the agent records use the database, so they live in services/;
    messaging/ keeps the protocol, the credential format and the nats-server launch."""
    offenders = []
    for path in sorted((ROOT / "adaptery" / "messaging").rglob("*.py")):
        for line, module in imported_modules(path, ROOT):
            if any(module == prefix or module.startswith(prefix + ".") for prefix in UPPER):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not offenders, "\n".join(offenders)
