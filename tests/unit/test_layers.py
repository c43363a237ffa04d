"""Dependencies point downward: the libraries (engine, training, data) and the agent know nothing of HTTP, the
database or the control plane (ARCHITECTURE.md, "Package layout"). Every import counts, a function's too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOWER = ("engine", "training", "data", "agent", "evaluation")
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
            if any(module == prefix or module.startswith(prefix + ".") for prefix in (*UPPER, "adaptery.agent")):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not offenders, "\n".join(offenders)


# Routers and CLI commands are thin: services run the SQL (ARCHITECTURE.md, "Package layout"; STYLE.md).
FACES = ("api", "cli")
SQL_NAMES = frozenset({"select", "insert", "update", "delete", "func", "text", "and_", "or_", "exists"})
SQL_CALLS = frozenset({"execute", "scalar", "scalars", "query"})
# A face that truly needs SQL says why here; none does today (api/deps.py only opens sessions for services).
RUNS_SQL_ALLOWED: dict[str, str] = {}


def runs_sql(path: Path, root: Path) -> list[str]:
    """Every place `path` imports a query builder from sqlalchemy, or calls a session's execute/scalar(s)/query,
    anywhere in the module (a function's own imports too)."""
    where = path.relative_to(root)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlalchemy":
            found += [f"{where}:{node.lineno} imports sqlalchemy's {a.name}" for a in node.names if a.name in SQL_NAMES]
        elif isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno} imports {a.name}" for a in node.names if a.name == "sqlalchemy"]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SQL_CALLS:
            found.append(f"{where}:{node.lineno} calls .{node.func.attr}()")
    return found


def faces_running_sql(root: Path = ROOT) -> list[str]:
    offenders = []
    for face in FACES:
        for path in sorted((root / "adaptery" / face).rglob("*.py")):
            if str(path.relative_to(root / "adaptery")) not in RUNS_SQL_ALLOWED:
                offenders += runs_sql(path, root)
    return offenders


def test_the_sql_check_sees_query_builders_session_calls_and_function_level_imports(tmp_path):
    router = tmp_path / "adaptery" / "api" / "x.py"
    router.parent.mkdir(parents=True)
    router.write_text(
        "from sqlalchemy.orm import Session\n"
        "def route(s):\n"
        "    from sqlalchemy import func, select\n"
        "    return s.scalars(select(1))\n"
    )
    command = tmp_path / "adaptery" / "cli" / "y.py"
    command.parent.mkdir(parents=True)
    command.write_text("import sqlalchemy\ndef cmd(session):\n    session.execute('x'); session.query(1).all()\n")
    assert faces_running_sql(tmp_path) == [
        "adaptery/api/x.py:3 imports sqlalchemy's func",
        "adaptery/api/x.py:3 imports sqlalchemy's select",
        "adaptery/api/x.py:4 calls .scalars()",
        "adaptery/cli/y.py:1 imports sqlalchemy",
        "adaptery/cli/y.py:3 calls .execute()",
        "adaptery/cli/y.py:3 calls .query()",
    ]


def test_routers_and_cli_commands_run_no_sql():
    offenders = faces_running_sql()
    assert not offenders, "services run the SQL; call one instead:\n" + "\n".join(offenders)
