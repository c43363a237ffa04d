"""`adaptery agents create NAME --roles ...`: the roles are stored on the agent (train,infer by default), and
anything else than train and infer is refused."""

from __future__ import annotations

import datetime as dt

from typer.testing import CliRunner

from adaptery.auth.agent_ca import CertificateAuthority, pem
from adaptery.cli.main import app
from adaptery.db.session import Database
from adaptery.messaging import identity
from adaptery.messaging.identity import Identity, IdentityDir
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


def test_an_enrolled_agent_dials_only_tls_or_nats_urls(tmp_path):
    """A hardening note of an attacker's: with a ws:// URL an enrolled agent sent its websocket upgrade in the clear
    (no credentials, but its host and version) and retried silently for ever."""
    ca = CertificateAuthority.load(tmp_path / "ca")
    key = identity.make_key()
    subject = identity.subject_name("tenant-a", "lab", "agent-a1")
    cert = ca.issue(identity.make_csr(key), subject, dt.timedelta(hours=1))
    me = Identity("agent-a1", "agent", "tenant-a", "lab", ["train"], "https://hub", "tls://hub:4222", None)
    IdentityDir(tmp_path / "id").save(me, key, pem(cert), ca.pem)
    for url in ("ws://127.0.0.1:4222", "wss://hub:443", "http://hub:4222"):
        refused = CliRunner().invoke(
            app, ["agent", "--identity", str(tmp_path / "id"), "--nats-url", url, "--data-dir", str(tmp_path / "d")],
            env={"COLUMNS": "200"},
        )  # fmt: skip
        assert refused.exit_code == 2 and "dials tls://host:port" in refused.output, refused.output
