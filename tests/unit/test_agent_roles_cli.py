"""`adaptery agents create NAME --roles ...`: the roles are stored on the agent (train,infer by default), and
anything else than train and infer is refused."""

from __future__ import annotations

from typer.testing import CliRunner

from adaptery.cli.main import app
from adaptery.db.session import Database
from adaptery.services import agents as agent_records


def test_agents_create_stores_the_roles_it_is_given(tmp_path):
    (tmp_path / "data").mkdir(mode=0o700)
    data = str(tmp_path / "data")
    runner, env = CliRunner(), {"COLUMNS": "200"}
    made = runner.invoke(app, ["agents", "create", "server", "--roles", "infer", "--data-dir", data], env=env)
    assert made.exit_code == 0, made.output
    default = runner.invoke(app, ["agents", "create", "worker", "--data-dir", data], env=env)
    assert default.exit_code == 0, default.output
    refused = runner.invoke(app, ["agents", "create", "odd", "--roles", "infer,gpu", "--data-dir", data], env=env)
    assert refused.exit_code == 1 and "roles are one or more of" in refused.output
    db = Database(f"sqlite:///{tmp_path / 'data' / 'adaptery.db'}")
    with db.system() as s:
        assert agent_records.find_agent(s, "server").roles == ["infer"]
        assert agent_records.find_agent(s, "worker").roles == ["infer", "train"]
        assert [a.name for a in agent_records.list_agents(s)] == ["server", "worker"]
