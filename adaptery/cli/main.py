"""`adaptery`: run the platform, or use a running one from the terminal."""

from __future__ import annotations

import io
import logging
import signal
import sys
import time
import zipfile
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
from rich.table import Column, Table

from adaptery.cli.client import api, api_key, base_url, openai_client
from adaptery.cli.evaluate import eval_app
from adaptery.cli.federated import federated_app
from adaptery.cli.feedback import feedback_app

app = typer.Typer(help="Adaptery: fine-tune and serve LoRA adapters on shared open LLMs.", no_args_is_help=True)
files_app = typer.Typer(help="Upload and list files.", no_args_is_help=True)
jobs_app = typer.Typer(help="Fine-tuning jobs.", no_args_is_help=True)
models_app = typer.Typer(help="Base models and adapters.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of your tenant.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants (run on the server machine; talks to the database).", no_args_is_help=True)
agents_app = typer.Typer(help="Agents: enrollment tokens, list, revoke.", no_args_is_help=True)
tokens_app = typer.Typer(help="One-time enrollment tokens for agents and islands.", no_args_is_help=True)
agents_app.add_typer(tokens_app, name="token")
agent_app = typer.Typer(help="Run an agent on this machine, or enroll it.", invoke_without_command=True)
island_app = typer.Typer(help="Islands: a NATS leaf node that dials the hub.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log (run on the server machine; talks to the database).", no_args_is_help=True)
users_app = typer.Typer(help="People (run on the server machine; talks to the database).", no_args_is_help=True)
storage_app = typer.Typer(help="The blob store against the database (run on the server machine).", no_args_is_help=True)
datasets_app = typer.Typer(
    help="Datasets: upload any format, validate, dedup, scrub, split, version.", no_args_is_help=True
)
names_app = typer.Typer(
    help="Stable model names: clients call a name; promote a version to it, roll back, canary.", no_args_is_help=True
)
for sub, name in (
    (files_app, "files"),
    (jobs_app, "jobs"),
    (models_app, "models"),
    (keys_app, "keys"),
    (tenants_app, "tenants"),
    (users_app, "users"),
    (audit_app, "audit"),
    (storage_app, "storage"),
    (agents_app, "agents"),
    (agent_app, "agent"),
    (island_app, "island"),
    (datasets_app, "datasets"),
    (federated_app, "federated"),
    (federated_app, "fed"),  # the short name the issue and the site instructions use
    (feedback_app, "feedback"),
    (eval_app, "eval"),
    (names_app, "names"),
):
    app.add_typer(sub, name=name)

console = Console(emoji=False)
GRACEFUL_SHUTDOWN_SECONDS = 10
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Data directory [env: ADAPTERY_DATA_DIR]")]
DatabaseUrl = Annotated[str | None, typer.Option("--database-url", help="[env: ADAPTERY_DATABASE_URL]")]


def _settings(**overrides: Any):  # noqa: ANN202 - Settings, imported lazily to keep client commands fast
    from adaptery.settings import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _migrated(data_dir: Path | None, database_url: str | None):  # noqa: ANN202 - (Settings, Database), lazily
    """The settings and the database of a command run on the server machine, its schema brought up to date."""
    from adaptery.db.session import Database

    settings = _settings(data_dir=data_dir, database_url=database_url)
    db = Database(settings.resolved_database_url)
    db.migrate()
    return settings, db


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="[env: ADAPTERY_HOST, default 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="[env: ADAPTERY_PORT, default 8000]")] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    agent: Annotated[bool | None, typer.Option("--agent/--no-agent", help="Run the embedded agent")] = None,
    tls: Annotated[bool | None, typer.Option("--tls", help="HTTPS with a certificate from the platform's CA")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="HTTPS with this certificate chain (PEM)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The key of --tls-cert (PEM)")] = None,
    insecure_listen: Annotated[
        bool | None, typer.Option("--insecure-listen", help="Allow plain HTTP beyond loopback (behind a TLS proxy)")
    ] = None,
) -> None:
    """Start the platform: API, web page, embedded agent and inference engine."""
    from adaptery.auth.tls import ensure_server_certificate, is_loopback

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings(
        host=host,
        port=port,
        data_dir=data_dir,
        database_url=database_url,
        embedded_agent=agent,
        tls=tls,
        tls_cert=tls_cert,
        tls_key=tls_key,
        insecure_listen=insecure_listen,
    )
    _set_up_process(settings)
    if not is_loopback(settings.host) and not settings.serves_tls and not settings.insecure_listen:
        console.print(
            f"[red]Refusing to listen on {settings.host} without TLS:[/red] anyone on the network could read "
            "prompts, datasets and API keys. Use --tls (a certificate from the platform's own CA), --tls-cert and "
            "--tls-key, or --insecure-listen if a TLS-terminating proxy sits in front."
        )
        raise typer.Exit(2)
    if (settings.tls_cert is None) != (settings.tls_key is None):
        console.print("[red]--tls-cert and --tls-key go together.[/red]")
        raise typer.Exit(2)
    # Only now, after a possible re-exec and the refusals above (imported before them, the app's ~15 s of
    # imports ran twice where the allocator is preloaded, and a refusal waited for them)
    import uvicorn

    from adaptery.api.app import create_app
    from adaptery.platform import Platform

    ssl_files: dict[str, str] = {}
    if settings.tls_cert is not None:
        ssl_files = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
    elif settings.tls:
        cert, key = ensure_server_certificate(settings.tls_dir, settings.host, settings.server_names)
        ssl_files = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
        console.print(f"HTTPS with the platform CA: clients trust {settings.tls_dir / 'ca.pem'}")
    try:
        platform = Platform(settings)
    except (RuntimeError, ValueError) as exc:  # a setting this machine cannot honour (say int8 without torchao)
        console.print(f"[red]Cannot start:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    first = platform.prepare()
    if first is not None:
        console.print(
            Panel.fit(
                f"Tenant [bold]{first.tenant}[/bold] and its owner [bold]{first.username}[/bold] were created.\n"
                "The sign-in link and API key below are shown only this once; only their hashes are stored.",
                title="Adaptery is ready — first start",
            )
        )
        # Plain lines (never wrapped or cut) so they can be copied, and read by scripts.
        print(f"ADAPTERY_LOGIN_URL={first.login_url}", flush=True)
        print(f"ADAPTERY_API_KEY={first.api_key}", flush=True)
    console.print(f"Serving on {settings.base_url} (data in {settings.data_dir.resolve()})")
    uvicorn.run(
        create_app(platform),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,  # a stuck client must not hold a restart hostage
        # uvloop and httptools, named (not uvicorn's "auto", which takes whatever happens to be installed): the
        # loop and parser the platform is tested with. Against asyncio's loop and h11 (bench/fabric.py, two infer
        # agents, 64 streams): 761-798 tokens/s rather than 740-750, 0.34-0.36 ms of server CPU a token, not 0.37.
        loop="uvloop",
        http="httptools",
        **ssl_files,
    )


@agent_app.callback()
def run_agent(
    ctx: typer.Context,
    credentials: Annotated[
        str | None,
        typer.Option("--credentials", help="From `adaptery agents create` [env: ADAPTERY_AGENT_CREDENTIALS]"),
    ] = None,
    identity_dir: Annotated[
        Path | None,
        typer.Option(
            "--identity", help="Enrolled identity dir (`adaptery agent enroll --dir`) [env: ADAPTERY_AGENT_IDENTITY]"
        ),
    ] = None,
    nats_url: Annotated[
        str | None, typer.Option("--nats-url", help="The platform's NATS server [env: ADAPTERY_NATS_URL]")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Work dir for jobs and models [env: ADAPTERY_DATA_DIR]")
    ] = None,
    roles: Annotated[
        str | None, typer.Option("--roles", help="train, infer or both: infer,train [env: ADAPTERY_AGENT_ROLES]")
    ] = None,
    base: Annotated[
        list[str] | None,
        typer.Option(
            "--base",
            help="A base model to serve: [ID=]PATH, or an ID alone to fetch it from the platform once (enrolled "
            "agents; verified by hash, safetensors only); repeatable; default: the demo model",
        ),
    ] = None,
    max_adapters: Annotated[int | None, typer.Option("--max-adapters", help="Adapters kept downloaded")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads")] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            "--engine",
            help="What infer serves with: native (Adaptery's engine) or vllm (`vllm serve` from its own environment, "
            "built on first use; `make vllm-env`) [env: ADAPTERY_AGENT_ENGINE]",
        ),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend",
            help="Where jobs train: local (this machine) or slurm (sbatch from a login node; the data dir on the "
            "cluster's shared filesystem; partition, account, time limit from ADAPTERY_SLURM_*) "
            "[env: ADAPTERY_AGENT_BACKEND]",
        ),
    ] = None,
) -> None:
    """Run a standalone agent: it dials the platform's NATS (or its island's leaf), leases training jobs and/or
    serves inference (no database, no inbound connection)."""
    if ctx.invoked_subcommand is not None:
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if backend not in (None, "local", "slurm"):
        console.print(f"[red]Unknown backend {backend!r}:[/red] use local or slurm.")
        raise typer.Exit(2)
    if engine not in (None, "native", "vllm"):
        console.print(f"[red]Unknown engine {engine!r}:[/red] use native or vllm.")
        raise typer.Exit(2)
    settings = _settings(
        data_dir=data_dir,
        nats_url=nats_url,
        agent_credentials=credentials,
        agent_identity=identity_dir,
        agent_roles=roles,
        agent_bases=base,
        agent_max_adapters=max_adapters,
        agent_torch_threads=threads,
        agent_backend=backend,
        agent_engine=engine,
    )
    wanted = {r.strip() for r in settings.agent_roles.split(",") if r.strip()}
    if not wanted or not wanted <= {"train", "infer"}:
        console.print(f"[red]--roles is train, infer or infer,train, not {settings.agent_roles!r}.[/red]")
        raise typer.Exit(2)
    if "infer" in wanted:
        _set_up_process(settings)
    # after the process set-up, which may re-execute this process (imported before, they were imported twice)
    from adaptery.agent.bases import BaseStore
    from adaptery.agent.enroll import Renewer, reload_into
    from adaptery.agent.link import AgentLink
    from adaptery.agent.slurm import SlurmBackend
    from adaptery.agent.transfers import HttpsTransfers
    from adaptery.agent.vault import AgentVault
    from adaptery.agent.worker import Agent
    from adaptery.messaging.credentials import parse_token
    from adaptery.messaging.identity import IdentityDir

    renewer = None
    if settings.agent_identity is not None:
        store = IdentityDir(settings.agent_identity)
        try:
            me = store.identity()
        except FileNotFoundError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from exc
        url = settings.nats_url or me.nats_url
        if not url:
            console.print("[red]Where is the platform?[/red] pass --nats-url (the hub's, or your island leaf's).")
            raise typer.Exit(2)
        if not url.startswith(("tls://", "nats://")):  # a websocket URL would send its upgrade in the clear
            console.print(f"[red]An enrolled agent dials tls://host:port[/red] (the hub's or its leaf's), not {url}")
            raise typer.Exit(2)
        context = store.ssl_context()
        # Artifacts travel over the platform's HTTPS, which it enrolled with, never the bus
        transfers = HttpsTransfers(me.server_url, settings.agent_identity)
        link = AgentLink(url, me.agent_id, tls=context, transfers=transfers, tls_hostname=me.tls_hostname(url))
        renewer = Renewer(settings.agent_identity, lambda: reload_into(context, settings.agent_identity))
        agent_id = me.agent_id
    else:
        if not settings.agent_credentials:
            console.print("[red]No credentials:[/red] pass --identity (enrolled) or --credentials.")
            raise typer.Exit(2)
        try:
            agent_id, secret = parse_token(settings.agent_credentials)
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from exc
        url = settings.nats_url
        written = settings.nats_dir / "url"
        if url is None and written.is_file():  # a serve on this machine's data dir said where its NATS listens
            url = written.read_text().strip()
        if not url:
            console.print("[red]Where is the platform?[/red] pass --nats-url nats://host:port (printed by serve).")
            raise typer.Exit(2)
        link = AgentLink(url, agent_id, secret)
    try:
        link.connect()
    except Exception as exc:
        console.print(f"[red]Cannot join the platform at {url}:[/red] {exc}")
        raise typer.Exit(1) from exc
    host = None
    if "infer" in wanted:
        try:
            host = _inference_host(settings, link, sorted(wanted))
        except (OSError, RuntimeError, ValueError) as exc:
            link.close()
            console.print(f"[red]Cannot serve inference:[/red] {escape(str(exc))}")
            raise typer.Exit(2) from exc
    if renewer is not None:
        renewer.start()
    worker = Agent(
        link,
        settings.work_dir,
        name=agent_id,
        heartbeat_seconds=settings.job_heartbeat_seconds,
        poll_seconds=settings.agent_poll_seconds,
        models_dir=settings.models_dir,
        backend=SlurmBackend(settings, agent_id) if settings.agent_backend == "slurm" else None,
        # a fetched base lives in this machine's private scratch: not for a Slurm job on other nodes
        bases=BaseStore(settings.work_dir / "bases", AgentVault(settings.agent_key_file))
        if settings.agent_identity is not None and settings.agent_backend != "slurm"
        else None,
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.stop())
    console.print(f"Agent [bold]{agent_id}[/bold] connected to {url} as {', '.join(sorted(wanted))} (Ctrl-C to stop)")
    try:
        if "train" in wanted:
            worker.run()
        else:
            while not worker.stopping.wait(1.0):
                pass
    finally:
        if host is not None:
            host.stop()
            host.engine.stop()
        if renewer is not None:
            renewer.stop()
        link.close()


# Set by main(): the process is this command line. A command invoked in another program's process (typer's
# CliRunner in the tests) must never replace that process with itself.
_RUN_AS_PROGRAM = False


def _set_up_process(settings: Any) -> None:  # noqa: ANN401 - Settings, imported lazily
    """The allocator of a serving process (adaptery/engine/process_setup.py): this may replace the process with
    itself, once, so it runs before anything is started."""
    from adaptery.engine.process_setup import SetupError, reexec_if_needed

    if not _RUN_AS_PROGRAM:
        return

    try:
        reexec_if_needed(settings.allocator)
    except SetupError as exc:
        console.print(f"[red]Cannot start:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc


def _inference_host(settings: Any, link: Any, roles: list[str]) -> Any:  # noqa: ANN401 - lazily imported types
    """The engine `serve` embeds, for the agent's bases, fed over the link."""
    import torch

    from adaptery.agent.bases import BaseStore
    from adaptery.agent.inference import InferenceHost
    from adaptery.agent.vault import AgentVault
    from adaptery.engine.demo_model import DEMO_MODEL_ID, ensure_demo_model
    from adaptery.engine.generation import InferenceEngine

    if settings.agent_torch_threads:
        torch.set_num_threads(settings.agent_torch_threads)
    vault = AgentVault(settings.agent_key_file)
    base_store = BaseStore(settings.work_dir / "bases", vault)
    bases: dict[str, str] = {}
    for entry in settings.agent_bases:
        base_id, _, path = entry.rpartition("=")
        if not base_id and not Path(path).is_dir():  # an id alone: fetched from the platform, verified by hash
            bases[path] = str(base_store.ensure(link, path))
            continue
        if not Path(path).is_dir():
            raise ValueError(f"--base {entry}: no model directory at {path}")
        bases[base_id or Path(path).resolve().name] = str(Path(path).resolve())
    if not bases:
        bases[DEMO_MODEL_ID] = str(ensure_demo_model(settings.models_dir))
    if settings.agent_engine == "vllm":
        from adaptery.agent.vllm_engine import VllmEngine

        engine = VllmEngine.from_settings(settings, bases=len(bases))
    else:
        engine = InferenceEngine.from_settings(settings)
    host = InferenceHost(
        link,
        engine,
        bases,
        settings.work_dir / "adapters",
        vault=vault,
        roles=roles,
        max_adapters=settings.agent_max_adapters,
        announce_seconds=settings.agent_announce_seconds,
        coalesce_seconds=settings.agent_stream_coalesce_seconds,
    )
    host.start()
    return host


@agent_app.command("enroll")
def enroll_agent(
    server: Annotated[str, typer.Option("--server", help="The platform's URL (https://…)")],
    token: Annotated[str, typer.Option("--token", help="An agent token: `adaptery agents token create`")],
    directory: Annotated[Path, typer.Option("--dir", help="Where to keep this agent's key and certificate")],
) -> None:
    """Join the platform: make a key pair here, send a CSR with the token, keep the certificate (renewed by itself)."""
    from adaptery.agent.enroll import EnrollmentError, enroll

    try:
        me = enroll(server, token, directory, kind="agent")
    except (EnrollmentError, httpx.HTTPError) as exc:
        console.print(f"[red]Cannot enroll:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    scope = f"tenant {me.tenant_id}" if me.tenant_id else "the platform"
    console.print(f"Enrolled as [bold]{me.agent_id}[/bold] for {scope}, island {me.island}, roles {','.join(me.roles)}")
    print(f"ADAPTERY_AGENT_ID={me.agent_id}", flush=True)
    print(f"ADAPTERY_AGENT_IDENTITY={directory.resolve()}", flush=True)


@island_app.command("up")
def island_up(
    hub: Annotated[str, typer.Option("--hub", help="The platform's URL (https://…)")],
    directory: Annotated[Path, typer.Option("--dir", help="Where to keep the island's key and certificate")],
    token: Annotated[
        str | None,
        typer.Option("--token", help="A leaf token, `adaptery agents token create --kind leaf` (first start only)"),
    ] = None,
    port: Annotated[int, typer.Option("--port", help="Where the island's agents connect (127.0.0.1)")] = 4222,
    leaf_url: Annotated[str | None, typer.Option("--leaf-url", help="Dial the hub here (default: as enrolled)")] = None,
) -> None:
    """Run this island's NATS leaf node: it dials the hub over mutual TLS; the island's agents connect to it."""
    from adaptery.agent.enroll import EnrollmentError, Renewer, enroll
    from adaptery.messaging.identity import IdentityDir
    from adaptery.messaging.leaf import IslandLeaf

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = IdentityDir(directory)
    if not store.exists():
        if not token:
            console.print(f"[red]{directory} holds no island identity:[/red] pass --token (first start).")
            raise typer.Exit(2)
        try:
            enroll(hub, token, directory, kind="leaf")
        except (EnrollmentError, httpx.HTTPError) as exc:
            console.print(f"[red]Cannot enroll:[/red] {escape(str(exc))}")
            raise typer.Exit(1) from exc
    me = store.identity()
    url = leaf_url or me.leaf_url
    if me.kind != "leaf" or not url:
        console.print("[red]Not an island:[/red] enroll with a token and a hub that has a leafnode port.")
        raise typer.Exit(2)
    leaf = IslandLeaf(directory, hub_url=url, port=port)
    try:
        leaf.start()
    except RuntimeError as exc:
        console.print(f"[red]Cannot start the leaf node:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    renewer = Renewer(directory, leaf.reload)
    renewer.start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: leaf.request_stop())
    print(f"ADAPTERY_ISLAND_URL={leaf.url}", flush=True)
    console.print(f"Island [bold]{me.island}[/bold] ({me.agent_id}) dials {url}; agents connect to {leaf.url}")
    code = leaf.wait()
    renewer.stop()
    raise typer.Exit(0 if code in (0, -signal.SIGTERM) else 1)


@agents_app.command("create")
def create_agent(
    name: str,
    tenant: Annotated[str | None, typer.Option(help="Only run this tenant's jobs (tenant name)")] = None,
    roles: Annotated[
        str,
        typer.Option(
            "--roles",
            help="What it may do: train, infer, or both: train,infer (the control plane "
            "enforces it: an infer-only agent leases no training job)",
        ),
    ] = "train,infer",
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Enroll an agent; prints its credentials once (only a bcrypt hash is kept). serve applies it within seconds."""
    from adaptery.services import agents as agent_records
    from adaptery.services import tenants
    from adaptery.services.errors import ServiceError

    settings, db = _migrated(data_dir, database_url)
    try:
        with db.system() as s:
            scope = None
            if tenant is not None:
                if (named := tenants.tenant_named(s, tenant)) is None:
                    raise typer.BadParameter(f"no tenant named '{tenant}'", param_hint="--tenant")
                scope = named.id
            wanted = [r.strip() for r in roles.split(",") if r.strip()]
            created = agent_records.create_agent(s, name, tenant_scope=scope, roles=wanted)
    except ServiceError as exc:
        console.print(f"[red]Error:[/red] {exc.message}")
        raise typer.Exit(1) from exc
    print(f"ADAPTERY_AGENT_CREDENTIALS={created.token}")


@agents_app.command("list")
def list_agents() -> None:
    """Enrolled agents, live: state (lost: an infer agent that stopped announcing), roles, bases, resident adapters,
    tokens/s, queue depth, running requests, last heartbeat and current job (owners and platform admins)."""
    columns = ("id", "name", "state", "roles", "bases", "adapters", "tok/s", "queue", "running", "heartbeat", "job")
    table = Table(*columns)
    for agent in api("GET", "/api/admin/agents")["data"]:
        seen = agent["last_heartbeat_at"]
        tiers = agent.get("adapters") or {}
        resident = sum(len(v) if isinstance(v, list) else int(v) for k, v in tiers.items() if k != "loading")
        table.add_row(
            agent["id"],
            agent["name"],
            agent["state"],
            ",".join(agent.get("roles") or []),
            ",".join(agent.get("bases") or []),
            str(resident) if tiers else "",
            *(  # None: a machine shared with other tenants, whose load is theirs too
                "—" if agent.get(field) is None else f"{agent[field]:g}"
                for field in ("tokens_per_second", "queue_depth", "running")
            ),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seen)) if seen else "never",
            agent["current_job"] or "",
        )
    console.print(table)


@agents_app.command("revoke")
def revoke_agent(agent: str, data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Revoke an agent or island (by id or name) and its certificates: the server disconnects it within a second,
    refuses its renewal, and its job goes back to the queue."""
    from adaptery.db.session import Database
    from adaptery.services import agents as agent_records
    from adaptery.services import enrollment
    from adaptery.services.errors import ServiceError

    settings = _settings(data_dir=data_dir, database_url=database_url)
    db = Database(settings.resolved_database_url)
    try:
        with db.system() as s:
            revoked = enrollment.revoke(s, agent_records.find_agent(s, agent))
            console.print(f"Agent {revoked.id} ({revoked.name}) revoked")
    except ServiceError as exc:
        console.print(f"[red]Error:[/red] {exc.message}")
        raise typer.Exit(1) from exc


@tokens_app.command("create")
def create_enrollment_token(
    scope: Annotated[str, typer.Option("--scope", help="tenant (your tenant's island) or platform")] = "tenant",
    kind: Annotated[
        str, typer.Option("--kind", help="agent (`adaptery agent enroll`) or leaf (`adaptery island up`)")
    ] = "agent",
    roles: Annotated[
        str | None, typer.Option("--roles", help="An agent's: train, infer, or both: train,infer (default train)")
    ] = None,
    ttl: Annotated[float, typer.Option("--ttl", help="Seconds the token stays usable")] = 3600,
    island: Annotated[str, typer.Option("--island", help="The island the machine joins")] = "default",
) -> None:
    """A one-time enrollment token for `adaptery agent enroll` (an agent's) or `adaptery island up` (a leaf's,
    `--kind leaf`); shown once."""
    body: dict[str, object] = {"scope": scope, "kind": kind, "ttl_seconds": ttl, "island": island}
    if roles is not None:
        body["roles"] = [r.strip() for r in roles.split(",") if r.strip()]
    created = api("POST", "/api/admin/agents/tokens", json=body)
    expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created["expires_at"]))
    what = f"roles {','.join(created['roles'])}" if created["kind"] == "agent" else "an island's leaf node"
    console.print(f"Token {created['id']} for the {scope} (island {island}, {what}), usable once until {expires}")
    print(f"ADAPTERY_ENROLLMENT_TOKEN={created['token']}", flush=True)


@tokens_app.command("list")
def list_enrollment_tokens() -> None:
    """The enrollment tokens not used yet and not expired (the tokens themselves are never shown again)."""
    pending = api("GET", "/api/admin/agents/tokens")["data"]
    if not pending:
        console.print("No unspent enrollment token.")
        return
    table = Table("scope", "island", "kind", "roles", "made by", "expires")
    # whole, however narrow the terminal: it is what `delete` takes
    table.columns.insert(0, Column("id", no_wrap=True, min_width=max(len(token["id"]) for token in pending)))
    for token in pending:
        expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(token["expires_at"]))
        table.add_row(
            token["id"], token["scope"], token["island"], token["kind"], ",".join(token["roles"]),
            token["created_by"] or "", expires,
        )  # fmt: skip
    console.print(table)


@tokens_app.command("delete")
def withdraw_enrollment_token(token_id: str) -> None:
    """Withdraw an unspent enrollment token: nothing can enroll with it any more."""
    api("DELETE", f"/api/admin/agents/tokens/{token_id}")
    console.print(f"Token {token_id} withdrawn")


@tenants_app.command("create")
def create_tenant(
    name: str,
    owner: Annotated[str, typer.Option(help="Username of the tenant's owner")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a tenant and its owner; prints the owner's API key and sign-in link once (an owner who already
    has an account: the one-time link with which they accept the tenant's invitation instead)."""
    from adaptery.services import tenants
    from adaptery.services.errors import ServiceError

    settings, db = _migrated(data_dir, database_url)
    try:
        with db.system() as s:
            created = tenants.create_tenant(
                s,
                name,
                owner,
                login_link_hours=settings.login_link_hours,
                invitation_days=settings.invitation_days,
            )
    except ServiceError as exc:
        console.print(f"[red]Error:[/red] {exc.message}")
        raise typer.Exit(1) from exc
    if created.invitation:
        console.print(
            f"'{owner}' already has an account: they are invited as owner of '{name}'. Send this one-time link "
            f"privately to the person you mean; they open it signed in as themself and accept (for "
            f"{settings.invitation_days:g} days). It is not shown again."
        )
        print(
            f"ADAPTERY_ACCEPT_URL={settings.base_url}{tenants.accept_path(created.invitation.id, created.accept_token)}"
        )
        return
    print(f"ADAPTERY_LOGIN_URL={settings.base_url}/auth/link?token={created.login_token}")
    print(f"ADAPTERY_API_KEY={created.api_key}")


@tenants_app.command("invite-owner")
def renew_owner_invitation(
    name: str,
    owner: Annotated[str, typer.Option(help="Username of the person invited as the tenant's owner")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """A fresh one-time accept link for the owner invitation `tenants create` gave a person who already had an
    account, when it expired or was lost before they accepted (the earlier link stops working)."""
    from adaptery.services import audit, tenants
    from adaptery.services.errors import ServiceError

    settings, db = _migrated(data_dir, database_url)
    try:
        with db.system() as s:
            tenant, invitation, token = tenants.renew_owner_invitation(s, name, owner, days=settings.invitation_days)
            audit.record(
                s, None, "tenant.owner_invitation_renewed", target=owner, tenant_id=tenant.id, actor="operator"
            )
    except ServiceError as exc:
        console.print(f"[red]Error:[/red] {exc.message}")
        raise typer.Exit(1) from exc
    console.print(
        f"A new one-time link for '{owner}' to accept the ownership of '{name}' (for {settings.invitation_days:g} "
        "days; the earlier link no longer works). Send it privately to the person you mean."
    )
    print(f"ADAPTERY_ACCEPT_URL={settings.base_url}{tenants.accept_path(invitation.id, token)}")


@users_app.command("reset-link")
def user_reset_link(
    username: str,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """A one-time link for a person who asked to reset a forgotten password (give it to them only): it signs
    them in, where they set a new password; their other sessions end when they do."""
    from adaptery.services import audit, tenants
    from adaptery.services.errors import ServiceError

    settings, db = _migrated(data_dir, database_url)
    try:
        with db.system() as s:
            tenant, token = tenants.reset_link(s, username, hours=settings.login_link_hours)
            audit.record(s, None, "user.reset_link", target=username, tenant_id=tenant.id, actor="operator")
    except ServiceError as exc:
        console.print(f"[red]Error:[/red] {exc.message}")
        raise typer.Exit(1) from exc
    print(f"ADAPTERY_LOGIN_URL={settings.base_url}/auth/link?token={token}")


@audit_app.command("verify")
def verify_audit(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Check the audit log's hash chain; exits 1 and names the first broken row if it was tampered with."""
    from adaptery.services import audit

    settings, db = _migrated(data_dir, database_url)
    with db.system() as s:
        result = audit.verify(s)
    if result.ok:
        console.print(f"[green]Audit log intact:[/green] {result.rows} events, hash chain verified.")
        return
    console.print(f"[red]Audit log broken at row {result.first_broken_seq}:[/red] {result.problem}")
    raise typer.Exit(1)


@storage_app.command("check")
def check_storage(
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Also decrypt every blob and check that it hashes to its name")
    ] = False,
    remove_unreferenced: Annotated[
        bool, typer.Option("--remove-unreferenced", help="Delete the files no row names (past the grace period)")
    ] = False,
    grace_hours: Annotated[
        float, typer.Option(help="Leave unreferenced files younger than this alone (uploads in flight)")
    ] = 1.0,
) -> None:
    """Every blob the database names is on disk (and, with --verify, intact); lists what no row names.

    Exits 1 if a named blob is missing or does not authenticate. Safe while servers run.
    """
    from adaptery.services.storage_check import check_storage as check
    from adaptery.storage.blobs import BlobStore
    from adaptery.storage.crypto import LocalKeyProvider
    from adaptery.storage.keys import Keyring
    from adaptery.storage.modes import make_scratch

    settings, db = _migrated(data_dir, database_url)
    blobs = BlobStore(settings.blobs_dir, Keyring(db, LocalKeyProvider.from_settings(settings)), make_scratch())
    try:
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} blobs"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("verifying" if verify else "checking", total=None)
            report = check(
                db,
                blobs,
                verify=verify,
                remove_unreferenced=remove_unreferenced,
                grace_seconds=grace_hours * 3600,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    finally:
        db.dispose()
    for problem in report.problems:
        console.print(
            f"[red]tenant {problem.tenant_id}: blob {problem.sha256[:16]}… {problem.problem}[/red]; "
            f"named by {', '.join(problem.used_by)}"
        )
    state = "intact" if verify else "present"
    console.print(
        f"{report.tenants} tenants, {report.referenced} blobs named by the database: "
        f"{report.referenced - len(report.problems)} {state}, {len(report.problems)} with problems."
    )
    if report.unreferenced:
        action = "removed" if remove_unreferenced else "not removed (--remove-unreferenced)"
        console.print(f"{len(report.unreferenced)} files no row names ({report.unreferenced_bytes:,} bytes), {action}.")
    if report.young:
        console.print(f"{report.young} unreferenced files younger than {grace_hours:g} h left alone.")
    if not report.ok:
        raise typer.Exit(1)


@keys_app.command("rotate-master")
def rotate_master_key(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Rotate the master key that wraps the tenants' data keys (run on the server machine, servers may keep running).

    Only the tenants' data keys are re-wrapped; no stored data is re-encrypted. With the key file, running
    servers pick the new key up by themselves and the old key is gone afterwards. With ADAPTERY_MASTER_KEY, the
    new key is taken from ADAPTERY_NEW_MASTER_KEY (or made and printed): set ADAPTERY_MASTER_KEY to it
    (`new,old` for servers that keep running until their restart).
    """
    from adaptery.storage.crypto import LocalKeyProvider
    from adaptery.storage.keys import rotate_master_key as rotate

    settings, db = _migrated(data_dir, database_url)
    provider = LocalKeyProvider.from_settings(settings)
    new_key = settings.new_master_key.get_secret_value() if settings.new_master_key else None
    try:
        result = rotate(db, provider, new_key or None)
    except ValueError as exc:
        console.print(f"[red]Error:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        db.dispose()
    console.print(
        f"[green]Master key rotated:[/green] {result.old_key_id} → {result.new_key_id}, "
        f"{result.rewrapped} tenant data keys re-wrapped."
    )
    if result.new_key_text is not None:
        print(f"ADAPTERY_MASTER_KEY={result.new_key_text}")


@keys_app.command("rotate")
def rotate_key(
    key_id: str,
    overlap_seconds: Annotated[float, typer.Option(help="How long the old secret keeps working")] = 3600,
) -> None:
    """A new secret for a key (same id); printed once. The old one works for the overlap window."""
    created = api("POST", f"/api/keys/{key_id}/rotate", json={"overlap_seconds": overlap_seconds})
    print(created["value"])


@files_app.command("upload")
def upload_file(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    purpose: str = "fine-tune",
) -> None:
    """Upload a file (chat-format JSONL for fine-tuning)."""
    with path.open("rb") as handle:
        created = openai_client().files.create(file=(path.name, handle), purpose=purpose)
    console.print(f"Uploaded [bold]{created.id}[/bold] ({created.bytes} bytes, {created.filename})")


@files_app.command("list")
def list_files() -> None:
    table = Table("id", "filename", "purpose", "bytes", "created")
    for f in openai_client().files.list():
        table.add_row(
            f.id, f.filename, f.purpose, str(f.bytes), time.strftime("%Y-%m-%d %H:%M", time.localtime(f.created_at))
        )
    console.print(table)


@jobs_app.command("create")
def create_job(
    training_file: Annotated[str, typer.Option("--training-file", "-t", help="File id from `files upload`")],
    model: Annotated[str, typer.Option("--model", "-m")] = "adaptery-demo",
    suffix: Annotated[str | None, typer.Option()] = None,
    epochs: Annotated[int | None, typer.Option(help="Default: the base model's recommendation")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    learning_rate_multiplier: Annotated[float | None, typer.Option()] = None,
    validation_file: Annotated[str | None, typer.Option()] = None,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="Show progress until it ends")] = True,
) -> None:
    """Start fine-tuning an adapter."""
    hyperparameters = {
        k: v
        for k, v in {
            "n_epochs": epochs,
            "batch_size": batch_size,
            "learning_rate_multiplier": learning_rate_multiplier,
        }.items()
        if v is not None
    }
    import openai  # the OpenAI client: imported by the commands that use it

    job = openai_client().fine_tuning.jobs.create(
        model=model,
        training_file=training_file,
        validation_file=validation_file,
        suffix=suffix,
        hyperparameters=hyperparameters or openai.omit,
    )
    console.print(f"Created job [bold]{job.id}[/bold] ({job.status})")
    if follow:
        follow_job(job.id)


@jobs_app.command("list")
def list_jobs(limit: int = 20) -> None:
    table = Table("id", "model", "status", "fine-tuned model", "created")
    for job in openai_client().fine_tuning.jobs.list(limit=limit).data:
        table.add_row(
            job.id,
            job.model,
            job.status,
            job.fine_tuned_model or "",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created_at)),
        )
    console.print(table)


@jobs_app.command("cancel")
def cancel_job(job_id: str) -> None:
    job = openai_client().fine_tuning.jobs.cancel(job_id)
    console.print(f"Job {job.id}: {job.status}")


@jobs_app.command("pause")
def pause_job(job_id: str) -> None:
    """Pause a job: a running one stops at its next step with a checkpoint."""
    job = api("POST", f"/v1/fine_tuning/jobs/{job_id}/pause")
    console.print(f"Job {job['id']}: {job['status']}{' (pausing)' if job['status'] == 'running' else ''}")


@jobs_app.command("resume")
def resume_job(job_id: str) -> None:
    """Resume a paused job from its latest checkpoint."""
    job = api("POST", f"/v1/fine_tuning/jobs/{job_id}/resume")
    console.print(f"Job {job['id']}: {job['status']}")


@jobs_app.command("follow")
def follow_job(job_id: str, poll: float = 1.0) -> None:
    """Live progress of a job: a bar over training steps, the loss, and every event."""
    client = openai_client()
    seen: set[str] = set()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("validating_files", total=None, loss="–")
        while True:
            job = client.fine_tuning.jobs.retrieve(job_id)
            events = client.fine_tuning.jobs.list_events(job_id, limit=100).data
            for event in reversed(events):
                if event.id in seen:
                    continue
                seen.add(event.id)
                data = event.data or {}
                if event.type == "metrics" and "step" in data:
                    progress.update(
                        task,
                        total=data.get("total_steps"),
                        completed=data["step"],
                        loss=f"{data.get('train_loss', float('nan')):.4f}",
                    )
                else:
                    style = {"error": "red", "warn": "yellow"}.get(event.level, "dim")
                    progress.console.print(f"[{style}]{escape(event.message)}[/{style}]")
            progress.update(task, description=job.status)
            if job.status in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(poll)
    if job.status == "succeeded":
        console.print(f"[green]Done.[/green] Fine-tuned model: [bold]{escape(job.fine_tuned_model)}[/bold]")
    elif job.status == "failed":
        console.print(f"[red]Failed:[/red] {escape(job.error.message if job.error else 'unknown error')}")
        raise typer.Exit(1)
    else:
        console.print("Cancelled.")


@models_app.command("list")
def list_models() -> None:
    table = Table("id", "owned by", "created")
    for model in openai_client().models.list():
        table.add_row(model.id, model.owned_by, time.strftime("%Y-%m-%d %H:%M", time.localtime(model.created)))
    console.print(table)


@models_app.command("download")
def download_model(
    model: str, output: Annotated[Path | None, typer.Option("--output", "-o", help="Zip file to write")] = None
) -> None:
    """Download an adapter as a zip of its PEFT directory (loadable by PeftModel.from_pretrained)."""
    target = output or Path(model.replace(":", "_") + ".zip")
    with httpx.stream(
        "GET",
        f"{base_url()}/api/models/{model}/download",
        headers={"Authorization": f"Bearer {api_key()}"},
        timeout=600,
    ) as response:
        if response.status_code >= 400:
            response.read()
            console.print(f"[red]Error {response.status_code}:[/red] {escape(response.json()['error']['message'])}")
            raise typer.Exit(1)
        with target.open("wb") as out:
            for chunk in response.iter_bytes():
                out.write(chunk)
    console.print(f"Saved {target} (sha256 of the adapter: {response.headers.get('x-content-sha256', '?')[:12]}…)")


@models_app.command("import")
def import_model(
    path: Annotated[Path, typer.Argument(exists=True, readable=True, help="A PEFT adapter directory or its zip")],
    base: Annotated[str, typer.Option("--base", help="The base model it was trained on")],
    suffix: Annotated[str | None, typer.Option()] = None,
) -> str:
    """Register a LoRA adapter trained elsewhere (safetensors only) as one of your models."""
    if path.is_dir():
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(path.iterdir()):
                if file.is_file():
                    archive.write(file, file.name)
        data = buffer.getvalue()
    else:
        data = path.read_bytes()
    params = {"base_model": base, **({"suffix": suffix} if suffix else {})}
    created = api("POST", "/api/models/import", params=params, content=data)
    console.print(f"Imported as [bold]{escape(created['id'])}[/bold]")
    return created["id"]


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="A base model or ft:… adapter id")] = "adaptery-demo",
    message: Annotated[str | None, typer.Option("--message", "-m", help="Ask once and exit")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt")] = None,
    temperature: float = 0.0,
    max_tokens: int = 256,
) -> None:
    """Chat with a model, streamed. Without --message: an interactive session (empty line or Ctrl-D ends it)."""
    client = openai_client()
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def ask(text: str) -> None:
        history.append({"role": "user", "content": text})
        stream = client.chat.completions.create(
            model=model, messages=history, stream=True, temperature=temperature, max_tokens=max_tokens
        )
        answer = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                answer.append(chunk.choices[0].delta.content)
                console.print(chunk.choices[0].delta.content, end="", soft_wrap=True, highlight=False, markup=False)
        console.print()
        history.append({"role": "assistant", "content": "".join(answer)})

    if message is not None:
        ask(message)
        return
    while True:
        try:
            text = console.input("[bold]you>[/bold] ").strip()
        except EOFError:
            break
        if not text:
            break
        ask(text)


@keys_app.command("create")
def create_key(
    name: str = "",
    environment: Annotated[str, typer.Option("--env", help="dev, staging or prod")] = "dev",
    expires_days: Annotated[float | None, typer.Option(help="Expire after this many days")] = None,
) -> None:
    created = api("POST", "/api/keys", json={"name": name, "environment": environment, "expires_in_days": expires_days})
    console.print(f"Key [bold]{created['id']}[/bold] created. Its secret is shown only now:")
    print(created["value"])


@keys_app.command("list")
def list_keys() -> None:
    table = Table("id", "name", "env", "key", "last used", "state")
    now = time.time()
    for key in api("GET", "/api/keys")["data"]:
        state = (
            "revoked"
            if key["revoked_at"]
            else ("expired" if key["expires_at"] and key["expires_at"] < now else "active")
        )
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(key["last_used_at"])) if key["last_used_at"] else "never"
        table.add_row(key["id"], key["name"], key["environment"], key["redacted_value"], used, state)
    console.print(table)


@keys_app.command("revoke")
def revoke_key(key_id: str) -> None:
    api("DELETE", f"/api/keys/{key_id}")
    console.print(f"Key {key_id} revoked; it stops working on the next request.")


def _dataset_ref(ref: str) -> tuple[str, int | None]:
    """`name-or-id` (newest version) or `name-or-id@3`."""
    name, _, number = ref.partition("@")
    if number and not number.isdigit():
        raise typer.BadParameter(f"expected DATASET or DATASET@VERSION, got {ref!r}")
    return name, int(number) if number else None


def _version_number(dataset: str, number: int | None) -> int:
    if number is not None:
        return number
    versions = api("GET", f"/api/datasets/{dataset}")["versions"]
    if not versions:
        raise typer.BadParameter(f"dataset {dataset} has no versions")
    return versions[-1]["version"]


def _wait_for_versions(dataset_id: str, numbers: list[int]) -> list[dict]:
    """Show each version's processing progress until it is ready or failed."""
    done = []
    with Progress(
        TextColumn("[bold]{task.description}"),
        TextColumn("{task.fields[state]}"),
        TextColumn("{task.completed} records"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        for number in numbers:
            task = progress.add_task(f"version {number}", total=None, state="processing")
            while True:
                version = api("GET", f"/api/datasets/{dataset_id}/versions/{number}")
                progress.update(task, completed=version["records"] or version["progress"], state=version["status"])
                if version["status"] != "processing":
                    break
                time.sleep(0.5)
            done.append(version)
    return done


def _print_version(version: dict) -> None:
    state = {"ready": "green", "failed": "red"}.get(version["status"], "yellow")
    parent = f" from v{version['parent_version']}" if version["parent_version"] else ""
    console.print(
        f"v{version['version']} [{state}]{version['status']}[/{state}] {version['operation']}{parent}: "
        f"{version['records'] if version['records'] is not None else '?'} records, format {version['format']}, "
        f"sha256 {(version['sha256'] or '')[:12]}",
        highlight=False,
    )
    if version["error"]:
        console.print(f"  [red]{escape(version['error'])}[/red]")
    report = version.get("report") or {}
    validation = report.get("validation")
    if validation:
        console.print(
            f"  validation: {validation['records_valid']} valid, {validation['records_invalid']} invalid "
            f"of {validation['records_total']} (model {validation.get('model')})"
        )
        for error in validation["errors"][:20]:
            unit = error.get("unit", "line")
            field = f" {error['field']}:" if error.get("field") else ""
            console.print(
                f"  [red]{unit} {error['line']}:{escape(field)} {escape(error['message'])}[/red]", highlight=False
            )
        if validation["records_invalid"] > 20:
            console.print(f"  … and {validation['records_invalid'] - 20} more (see the API report)")
    if "dedup" in report:
        d = report["dedup"]
        console.print(
            f"  dedup: {d['records_in']} → {d['records_out']} ({d['exact_duplicates']} exact, "
            f"{d['near_duplicates']} near duplicates at threshold {d['threshold']})"
        )
    if "pii" in report:
        console.print(f"  scrubbed: {report['pii']['counts_by_kind']}")
    if "split" in report:
        console.print(
            f"  split: {report['split']['part']} part, {report['split']['records']} of {report['split']['of']}"
        )


@datasets_app.command("upload")
def upload_dataset(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    name: Annotated[str | None, typer.Option(help="Dataset name (default: the file name)")] = None,
    to: Annotated[str | None, typer.Option("--to", help="Add as a new version of this dataset")] = None,
    format: Annotated[str | None, typer.Option("--format", help="Override detection")] = None,
    mapping: Annotated[str | None, typer.Option(help="CSV/TSV columns: prompt=question,response=answer")] = None,
    model: Annotated[str | None, typer.Option(help="Base model to validate record lengths against")] = None,
) -> None:
    """Upload a file (OpenAI chat, Alpaca, ShareGPT, text, CSV/TSV), streamed with a progress bar."""
    size = path.stat().st_size
    params = {
        k: v
        for k, v in {"name": name, "format": format, "mapping": mapping, "filename": path.name, "model": model}.items()
        if v
    }

    with Progress(
        TextColumn("[bold]uploading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console
    ) as progress:
        task = progress.add_task("upload", total=size)

        def chunks():  # noqa: ANN202 - a generator of bytes
            with path.open("rb") as handle:
                while chunk := handle.read(1024 * 1024):
                    progress.advance(task, len(chunk))
                    yield chunk

        target = f"/api/datasets/{to}/versions" if to else "/api/datasets"
        if to:
            params.pop("name", None)
        body = api(
            "POST",
            target,
            params=params,
            content=chunks(),
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        )
    version = body["versions"][-1]
    console.print(f"Dataset [bold]{escape(body['name'])}[/bold] ({body['id']}), version {version['version']}")
    _print_version(_wait_for_versions(body["id"], [version["version"]])[0])


@datasets_app.command("list")
def list_datasets() -> None:
    table = Table("id", "name", "versions", "records (newest)", "protected", "updated")
    for d in api("GET", "/api/datasets")["data"]:
        newest = d["versions"][-1] if d["versions"] else {}
        table.add_row(
            d["id"],
            d["name"],
            str(len(d["versions"])),
            str(newest.get("records", "")),
            "yes" if d["contains_protected_data"] else "no",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(d["updated_at"])),
        )
    console.print(table)


@datasets_app.command("show")
def show_dataset(ref: Annotated[str, typer.Argument(help="DATASET or DATASET@VERSION")]) -> None:
    """The dataset card and its versions, or one version's report."""
    dataset, number = _dataset_ref(ref)
    body = api("GET", f"/api/datasets/{dataset}")
    if number is None:
        console.print(f"[bold]{escape(body['name'])}[/bold] ({body['id']})")
        for field in ("description", "source", "license"):
            if body[field]:
                console.print(f"  {field}: {escape(body[field])}")
        console.print(f"  contains protected data: {'yes' if body['contains_protected_data'] else 'no'}")
        for version in body["versions"]:
            _print_version(version)
        return
    version = api("GET", f"/api/datasets/{body['id']}/versions/{number}")
    _print_version(version)
    if version.get("stats"):
        console.print_json(data=version["stats"])


@datasets_app.command("versions")
def dataset_versions(dataset: str) -> None:
    """Each version with its lineage (what it was made from, and how)."""
    for version in api("GET", f"/api/datasets/{dataset}")["versions"]:
        _print_version(version)


@datasets_app.command("validate")
def validate_dataset(
    ref: str, model: Annotated[str | None, typer.Option(help="Base model (default: first)")] = None
) -> None:
    """Check every record of a version against a base model's context."""
    dataset, number = _dataset_ref(ref)
    number = _version_number(dataset, number)
    report = api(
        "POST", f"/api/datasets/{dataset}/versions/{number}/validate", params={"model": model} if model else None
    )
    _print_version(
        {
            "version": number,
            "status": "ready" if report["ok"] else "invalid",
            "operation": "validate",
            "parent_version": None,
            "records": report["records_total"],
            "format": "openai-chat",
            "sha256": "",
            "error": None,
            "report": {"validation": report},
        }
    )
    if not report["ok"]:
        raise typer.Exit(1)


def _run_operation(ref: str, operation: str, body: dict) -> None:
    dataset, number = _dataset_ref(ref)
    number = _version_number(dataset, number)
    created = api("POST", f"/api/datasets/{dataset}/versions/{number}/{operation}", json=body)["data"]
    for version in _wait_for_versions(created[0]["dataset_id"], [v["version"] for v in created]):
        _print_version(version)


@datasets_app.command("dedup")
def dedup_dataset(
    ref: str,
    threshold: Annotated[float, typer.Option(help="Jaccard similarity for near duplicates")] = 0.8,
    num_perm: int = 128,
    exact_only: Annotated[bool, typer.Option("--exact-only", help="Only exact duplicates")] = False,
) -> None:
    """Remove exact and near duplicates into a new version."""
    _run_operation(ref, "dedup", {"threshold": threshold, "num_perm": num_perm, "near": not exact_only})


@datasets_app.command("scrub")
def scrub_dataset(
    ref: str, kinds: Annotated[str | None, typer.Option(help="Comma-separated PII kinds (default: all)")] = None
) -> None:
    """Redact personal data into a new version."""
    _run_operation(ref, "scrub", {"kinds": kinds.split(",")} if kinds else {})


@datasets_app.command("split")
def split_dataset(ref: str, validation_fraction: float = 0.1, seed: int = 42) -> None:
    """A seeded train/validation split into two new versions."""
    _run_operation(ref, "split", {"validation_fraction": validation_fraction, "seed": seed})


@datasets_app.command("export")
def export_dataset(ref: str, allow_invalid: bool = False) -> None:
    """Make a version a fine-tuning file; prints its file id for `jobs create`."""
    dataset, number = _dataset_ref(ref)
    number = _version_number(dataset, number)
    created = api("POST", f"/api/datasets/{dataset}/versions/{number}/export", json={"allow_invalid": allow_invalid})
    console.print(
        f"File [bold]{created['id']}[/bold] ({created['bytes']} bytes) is ready: "
        f"adaptery jobs create -t {created['id']}"
    )


def _print_name(name: dict[str, Any]) -> None:
    canary = name["canary"]
    console.print(
        f"[bold]{escape(name['id'])}[/bold] answers from version {name['current_version']}"
        + (f"; canary: version {canary['version']} on {canary['share']:g} % of requests" if canary else "")
    )
    versions = Table("version", "adapter", "status", "job")
    for v in name["versions"]:
        status = "current" if v["version"] == name["current_version"] else ""
        status = "canary" if canary and v["version"] == canary["version"] else status
        versions.add_row(
            str(v["version"]), v["model"], "deleted" if v["deleted"] else status, v["fine_tuning_job"] or ""
        )
    console.print(versions)


def _version_arg(version: str) -> int | str:
    return int(version) if version.isdigit() else version


@names_app.command("list")
def list_names() -> None:
    table = Table("name", "id", "current", "canary")
    for name in api("GET", "/api/model_names")["data"]:
        canary = name["canary"]
        table.add_row(
            name["name"],
            name["id"],
            f"v{name['current_version']}",
            f"v{canary['version']} {canary['share']:g} %" if canary else "",
        )
    console.print(table)


@names_app.command("create")
def create_name(
    name: str, version: Annotated[str, typer.Argument(help="The adapter (ft:…) it answers from first")]
) -> None:
    """A stable name clients call: ft:<base>:<your workspace>:<name>."""
    _print_name(api("POST", "/api/model_names", json={"name": name, "version": version}))


@names_app.command("show")
def show_name(name: str) -> None:
    """The name's versions and its history of promotions, rollbacks and canaries."""
    body = api("GET", f"/api/model_names/{name}")
    _print_name(body)
    history = Table("when", "action", "from", "to", "share", "by")
    for e in body["history"]:
        history.add_row(
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["created_at"])),
            e["action"],
            f"v{e['from_version']}" if e["from_version"] else "",
            f"v{e['to_version']}" if e["to_version"] else "",
            f"{e['share']:g} %" if e["share"] is not None else "",
            e["actor"] or "",
        )
    console.print(history)


@names_app.command("promote")
def promote_name(
    name: str, version: Annotated[str, typer.Argument(help="A version number, or an adapter id (numbered next)")]
) -> None:
    """Clients of the name are answered by this version from their next request on."""
    _print_name(api("POST", f"/api/model_names/{name}/promote", json={"version": _version_arg(version)}))


@names_app.command("rollback")
def rollback_name(name: str) -> None:
    """Back to the version the latest promotion replaced."""
    _print_name(api("POST", f"/api/model_names/{name}/rollback"))


@names_app.command("canary")
def canary_name(
    name: str,
    version: Annotated[str | None, typer.Argument(help="The candidate version (or adapter id)")] = None,
    share: Annotated[float, typer.Option(help="Percent of the name's requests it answers")] = 10.0,
    end: Annotated[bool, typer.Option("--end", help="End the canary")] = False,
) -> None:
    """Send a share of the name's requests to a candidate version (chosen by request id)."""
    if end:
        _print_name(api("DELETE", f"/api/model_names/{name}/canary"))
        return
    if version is None:
        console.print("[red]Give the candidate version, or --end.[/red]")
        raise typer.Exit(2)
    body = {"version": _version_arg(version), "share": share}
    _print_name(api("PUT", f"/api/model_names/{name}/canary", json=body))


@names_app.command("fine-tune")
def fine_tune_name(
    name: str,
    training_file: Annotated[str | None, typer.Option("--training-file", "-t", help="A fine-tune file")] = None,
    dataset: Annotated[str | None, typer.Option(help="A dataset to train on instead (its latest version)")] = None,
    dataset_version: Annotated[int | None, typer.Option(help="The dataset's version")] = None,
    dpo: Annotated[bool, typer.Option("--dpo", help="Preference pairs (DPO) instead of supervised")] = False,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="Show progress until it ends")] = True,
) -> None:
    """Fine-tune from the name's current version; the result becomes its next version (promote it when ready)."""
    body: dict[str, Any] = {"training_file": training_file, "dataset": dataset, "dataset_version": dataset_version}
    if dpo:
        body["method"] = {"type": "dpo", "dpo": {}}
    job = api("POST", f"/api/model_names/{name}/fine_tune", json=body)
    console.print(f"Created [bold]{job['id']}[/bold], starting from {escape(job['lineage']['adapter'])}")
    if follow:
        follow_job(job["id"])


class _NeverRaised(Exception):
    pass


def _openai_error(name: str) -> type[BaseException]:
    """The OpenAI client's error class `name` once a command has imported the client, else one nothing raises (an
    except clause is evaluated only when an exception reaches it, after the command ran)."""
    module = sys.modules.get("openai")
    return getattr(module, name) if module is not None else _NeverRaised


def main() -> None:
    """Entry point: API failures become one clear line and exit code 1, not a traceback."""
    global _RUN_AS_PROGRAM
    _RUN_AS_PROGRAM = True  # this process is the command: a serving one may replace itself (_set_up_process)
    # the OpenAI client is imported only by the commands that use it (0.7 s of every command's start otherwise)
    try:
        app()
    except _openai_error("APIConnectionError") as exc:
        console.print(f"[red]Error:[/red] cannot reach Adaptery at {exc.request.url}: is `adaptery serve` running?")
        raise SystemExit(1) from None
    except _openai_error("APIStatusError") as exc:
        console.print(f"[red]Error {exc.status_code}:[/red] {escape(exc.message)}", highlight=False)
        raise SystemExit(1) from None
    except httpx.TransportError as exc:
        console.print(f"[red]Error:[/red] cannot reach Adaptery: {exc}")
        raise SystemExit(1) from None
