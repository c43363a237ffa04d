"""`adaptery federated ...`: run a federation's coordinator, or one site next to its own data.

    adaptery federated keygen site.key                     # each site, once: send site.pub to the coordinator
    adaptery federated coordinator --roster roster.json --base-model DIR --work-dir coord --rounds 3 \\
        --threshold 2 --register-base adaptery-demo        # SuperLink (TLS, node auth) + the rounds
    adaptery federated site --superlink HOST:PORT --ca coord/tls/ca.pem --key site.key --site 1 \\
        --roster roster.json --data local.jsonl --base-model DIR --work-dir site1

The roster (`{"1": "<site 1's site.pub>", ...}`) is agreed out of band and every site holds the same
file: a site checks the other sites' signed keys against its own copy, never against the coordinator's.

Or through the platform (`fed` is the short name of this group):

    adaptery fed invite FED --name clinic-a                # the coordinating admin: a one-time token
    adaptery fed join --server URL --token T --data local.jsonl --base-model DIR   # at the site
    adaptery fed coordinator --federation FED --base-model DIR --work-dir coord   # once the sites have joined

`fed join` makes the site's key on the site and registers it with the token; its signed check-ins then give
it the coordinator's SuperLink and the roster, whose fingerprints it prints to compare out of band.

Split fine-tuning (NOT private: the activations the site sends reveal its text to the coordinator):

    adaptery fed split-coordinator --base-model DIR --listen HOST:PORT --key-file split.key --out adapter
    adaptery fed split-site --coordinator HOST:PORT --key-file split.key --data local.jsonl --base-model DIR \\
        --out adapter                                      # both sides end with the same, whole adapter
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from adaptery.federated.config import FederatedLoraConfig

federated_app = typer.Typer(
    help="Federated fine-tuning: sites keep their data, the coordinator sees only the secure sum.",
    no_args_is_help=True,
)
console = Console(emoji=False)


@federated_app.command("create")
def create(
    name: str,
    base_model: Annotated[str, typer.Option(help="The platform's base model the sites train on")],
    threshold: Annotated[int | None, typer.Option(help="Sites needed per round [default: a majority]")] = None,
) -> None:
    """Record a federation in the platform (your tenant coordinates it)."""
    from adaptery.cli.client import api

    body = {"name": name, "base_model": base_model, **({"threshold": threshold} if threshold else {})}
    created = api("POST", "/api/federations", json=body)
    console.print(f"Federation [bold]{created['id']}[/bold] ({created['name']}, base {created['base_model']})")


@federated_app.command("add-site")
def add_site(
    federation: str,
    name: Annotated[str, typer.Option(help="The site's name")],
    key: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="The site's public key (site.pub)")],
) -> None:
    """Admit a site by its identity public key; prints its number and the key's fingerprint."""
    from adaptery.cli.client import api

    site = api("POST", f"/api/federations/{federation}/sites", json={"name": name, "public_key": key.read_text()})
    console.print(f"Site {site['number']} ({site['name']}): fingerprint {site['fingerprint']}")


@federated_app.command("roster")
def roster_command(
    federation: str, out: Annotated[Path, typer.Option(help="Where to write roster.json")] = Path("roster.json")
) -> None:
    """The federation's roster for the coordinator and the sites (each site checks the fingerprints out of band)."""
    from adaptery.cli.client import api

    record = api("GET", f"/api/federations/{federation}")
    out.write_text(json.dumps(api("GET", f"/api/federations/{federation}/roster"), indent=2) + "\n")
    for site in record["sites"]:
        console.print(f"site {site['number']} {site['name']}: {site['fingerprint']}")
    console.print(f"Roster written to {out}")


@federated_app.command("invite")
def invite(
    federation: str,
    name: Annotated[str, typer.Option(help="The site's name once it has joined")],
    ttl: Annotated[float, typer.Option(help="Seconds the token stays valid")] = 3600,
) -> None:
    """A one-time, expiring token for a site to join with `adaptery fed join` (shown once)."""
    from adaptery.cli.client import api, base_url

    made = api("POST", f"/api/federations/{federation}/invitations", json={"name": name, "ttl_seconds": ttl})
    console.print(f"Invitation {made['id']} for site {made['name']}; at the site run:")
    print(f"adaptery fed join --server {base_url()} --token {made['token']} --data local.jsonl --base-model DIR")


@federated_app.command("join")
def join_command(
    server: Annotated[str, typer.Option(help="The coordinating platform's URL")],
    data: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Local chat JSONL: never uploaded")],
    base_model: Annotated[Path, typer.Option(exists=True, file_okay=False, help="The base model's directory")],
    token: Annotated[str | None, typer.Option(help="The invitation (not needed to run an already joined site)")] = None,
    work_dir: Annotated[Path, typer.Option(help="This site's key, membership and Flower state")] = Path("fed-site"),
    runtime_port: int = 9094,
    check_in_every: Annotated[float, typer.Option(help="Seconds between signed check-ins")] = 15.0,
) -> None:
    """Join a federation with an invitation token and run this site next to its data, until stopped."""
    from adaptery.federated import join

    work_dir = work_dir.resolve()
    try:
        if token:
            membership = join.join(server, token, work_dir)
            console.print(f"Joined {membership.federation} as site {membership.number} ({membership.name})")
        elif (work_dir / join.MEMBERSHIP_FILE).exists():
            membership = join.Membership.load(work_dir)
        else:
            raise typer.BadParameter(f"{work_dir} holds no site: give --token", param_hint="--token")
        view = join.check_in(work_dir)
        while not join.write_run_files(work_dir, view):
            console.print("Waiting for the coordinator to start its SuperLink…")
            time.sleep(check_in_every)
            view = join.check_in(work_dir)
    except join.JoinError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from error
    roster = json.loads((work_dir / join.ROSTER_FILE).read_text())
    _show_fingerprints(roster)
    _run_site(
        superlink=view["superlink"],
        ca=work_dir / join.SUPERLINK_CA_FILE,
        key=work_dir / join.KEY_FILE,
        site_number=membership.number,
        roster=work_dir / join.ROSTER_FILE,
        data=data,
        base_model=base_model,
        work_dir=work_dir,
        runtime_port=runtime_port,
        heartbeat=(check_in_every, lambda: join.check_in(work_dir)),
    )


def _show_fingerprints(roster: dict[str, str]) -> None:
    import hashlib

    console.print("The roster of this run (compare these fingerprints with the sites out of band):")
    for number, key in sorted(roster.items(), key=lambda item: int(item[0])):
        console.print(f"  site {number}: {hashlib.sha256(key.split()[1].encode()).hexdigest()}")


@federated_app.command("keygen")
def keygen(path: Annotated[Path, typer.Argument(help="Where to write the site's private key (0600)")]) -> None:
    """A site identity key (EC P-384): its SuperNode authenticates with it and it signs the site's secagg keys."""
    from adaptery.federated import deploy

    if path.exists():
        raise typer.BadParameter(f"{path} exists: refusing to overwrite a site identity", param_hint="PATH")
    deploy.new_identity_key(path)
    console.print(f"Private key: {path}\nPublic key ({path.with_suffix('.pub')}), for the coordinator's roster:")
    print(path.with_suffix(".pub").read_text().strip())


def _check_roster(roster: Path) -> int:
    from adaptery.federated.apps import load_roster

    try:
        return len(load_roster(roster))
    except (ValueError, KeyError, TypeError) as error:
        raise typer.BadParameter(f"{roster}: {error}", param_hint="--roster") from error


@federated_app.command("coordinator")
def coordinator(
    base_model: Annotated[Path, typer.Option(exists=True, file_okay=False, help="The base model's directory")],
    work_dir: Annotated[Path, typer.Option(help="Flower state, TLS files, transcript and the adapter")],
    roster: Annotated[
        Path | None, typer.Option(exists=True, help='JSON {"site number": "OpenSSH public key"} (sites out of band)')
    ] = None,
    federation: Annotated[
        str | None, typer.Option(help="The platform's federation: its sites, and where the rounds are reported")
    ] = None,
    rounds: Annotated[int, typer.Option(min=1)] = 3,
    threshold: Annotated[int | None, typer.Option(help="Sites needed to finish a round [default: a majority]")] = None,
    host: str = "127.0.0.1",
    port: int = 9093,
    public_address: Annotated[str | None, typer.Option(help="HOST:PORT sites dial [default: host:port]")] = None,
    lora: Annotated[str, typer.Option(help='Recipe overrides as JSON, e.g. {"head_fraction": 0.25}')] = "{}",
    stage_timeout: float = 60.0,
    register_base: Annotated[str | None, typer.Option(help="Import the result into the platform on this base")] = None,
    suffix: Annotated[str | None, typer.Option(help="Suffix of the imported adapter's name")] = None,
) -> None:
    """Start a SuperLink (TLS, only registered site keys admitted), run the rounds, write the adapter. With
    --federation the roster is the platform's (the sites that joined), and every round is reported there."""
    from adaptery.auth.tls import ensure_server_certificate
    from adaptery.federated import deploy
    from adaptery.federated.config import FederatedLoraConfig
    from adaptery.federated.secagg import check_params

    if (roster is None) == (federation is None):
        raise typer.BadParameter("give exactly one of --roster and --federation")
    try:
        recipe = FederatedLoraConfig.from_dict(json.loads(lora))
    except (ValueError, TypeError) as error:
        raise typer.BadParameter(str(error), param_hint="--lora") from error
    work_dir = work_dir.resolve()
    home, out = work_dir / "flwr", work_dir / "out"
    if out.exists() and any(out.iterdir()):
        raise typer.BadParameter(f"{out} holds an earlier run: choose another --work-dir", param_hint="--work-dir")
    work_dir.mkdir(parents=True, exist_ok=True)
    address = public_address or f"{host}:{port}"
    public_host = address.rsplit(":", 1)[0]
    ensure_server_certificate(work_dir / "tls", host, extra_names=(public_host,) if public_host != host else ())
    link = deploy.start_superlink(home, host, port, work_dir / "tls", work_dir / "superlink.log")
    try:
        if federation:
            roster = _roster_of(federation, work_dir)
        sites = _check_roster(roster)
        threshold = threshold or sites // 2 + 1
        try:
            check_params(sites, threshold)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--threshold") from error
        deploy.wait_listening(host, port, link, timeout=120)
        _register(home, work_dir, roster)
        if federation:  # only now may sites dial: their keys are registered
            _publish(federation, address, work_dir, rounds, roster)
        adapter = _coordinate(home, work_dir, roster, base_model, rounds, threshold, recipe, stage_timeout, federation)
    finally:
        deploy.stop_flower(home)
    console.print(f"Adapter: {adapter}")
    if register_base:
        from adaptery.cli.main import import_model

        model = import_model(adapter, base=register_base, suffix=suffix)
        if federation:
            _report(federation, {"event": "adapter", "model": model})


def _roster_of(federation: str, work_dir: Path) -> Path:
    """The sites that joined the platform's federation so far, as this run's roster file."""
    from adaptery.cli.client import api

    path = work_dir / "roster.json"
    path.write_text(json.dumps(api("GET", f"/api/federations/{federation}/roster"), indent=2) + "\n")
    return path


def _register(home: Path, work_dir: Path, roster: Path) -> None:
    """Admit the roster's keys to the SuperLink (node authentication)."""
    from adaptery.federated import deploy

    keys = []
    for site, key in json.loads(roster.read_text()).items():
        path = work_dir / "keys" / f"site-{site}.pub"
        path.parent.mkdir(exist_ok=True)
        path.write_text(key.strip() + "\n")
        keys.append(path)
    deploy.register_sites(home, keys)


def _publish(federation: str, address: str, work_dir: Path, rounds: int, roster: Path) -> None:
    """Tell the platform where sites dial, with which CA, and which sites this run admits."""
    from adaptery.cli.client import api

    sites = sorted(int(number) for number in json.loads(roster.read_text()))
    body = {"superlink": address, "superlink_ca": (work_dir / "tls" / "ca.pem").read_text(), "rounds": rounds}
    published = api("PUT", f"/api/federations/{federation}/coordinator", json={**body, "sites": sites})
    _show_fingerprints(published)


def _report(federation: str, event: dict) -> None:
    from adaptery.cli.client import api

    api("POST", f"/api/federations/{federation}/events", json=event)


def _coordinate(
    home: Path,
    work_dir: Path,
    roster: Path,
    base_model: Path,
    rounds: int,
    threshold: int,
    recipe: FederatedLoraConfig,
    stage_timeout: float,
    federation: str | None,
) -> Path:
    from adaptery.federated import deploy
    from adaptery.federated.apps import CoordinatorJob

    sites = _check_roster(roster)
    out = work_dir / "out"
    job = CoordinatorJob(
        federation=work_dir.name,
        base_dir=str(base_model.resolve()),
        roster_path=str(roster.resolve()),
        out_dir=str(out),
        rounds=rounds,
        threshold=threshold,
        lora=json.loads(recipe.to_json()),
        min_sites=sites,
        stage_timeout=stage_timeout,
    )
    job.save(work_dir / "job.json")
    console.print(f"SuperLink up; sites verify it with {work_dir / 'tls' / 'ca.pem'}")
    run_id = deploy.start_run(home, deploy.write_app(work_dir / "app"), work_dir / "job.json")
    console.print(f"Run {run_id}: waiting for {sites} sites, then {rounds} rounds (threshold {threshold})")
    return _follow(out, (lambda event: _report(federation, event)) if federation else None)


def _follow(out: Path, report=None) -> Path:  # noqa: ANN001 - a callable taking each event, or None
    """Print the coordinator's progress as it comes (and pass each event to `report`: the platform's record)."""
    from adaptery.federated import deploy

    shown = 0
    while True:
        events = deploy.read_progress(out)
        for event in events[shown:]:
            if report is not None:
                _reported(report, event)
            if event.get("event") == "round":
                loss = "hidden (DP)" if event["loss"] is None else f"{event['loss']:.4f}"
                budget = (
                    f", privacy spent: epsilon {event['epsilon']:.2f} at delta {event['delta']:g}"
                    if "epsilon" in event
                    else ""
                )
                survivors, seconds = event["survivors"], event["seconds"]
                console.print(f"round {event['round']}: loss {loss}, survivors {survivors}, {seconds:.1f}s{budget}")
            elif event.get("error"):
                console.print(f"[yellow]{event.get('stage', '')} {event['error']}[/yellow]")
            if event.get("event") == "failed":
                raise typer.Exit(1)
            if event.get("event") == "done":
                return Path(event["adapter"])
        shown = len(events)
        time.sleep(0.5)


@federated_app.command("site")
def site(
    superlink: Annotated[str, typer.Option(help="The coordinator's SuperLink, HOST:PORT")],
    ca: Annotated[Path, typer.Option(exists=True, help="The coordinator's CA certificate (ca.pem)")],
    key: Annotated[Path, typer.Option(exists=True, help="This site's identity key (adaptery federated keygen)")],
    site_number: Annotated[int, typer.Option("--site", min=1, help="This site's number in the roster")],
    roster: Annotated[Path, typer.Option(exists=True, help="The roster, as agreed out of band")],
    data: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Local chat JSONL: never uploaded")],
    base_model: Annotated[Path, typer.Option(exists=True, file_okay=False)],
    work_dir: Annotated[Path, typer.Option(help="Flower state and this site's record of its contributions")],
    runtime_port: int = 9094,
) -> None:
    """Run this site's SuperNode next to its data, until stopped (Ctrl-C, SIGTERM) or the SuperLink is gone."""
    _run_site(
        superlink=superlink,
        ca=ca,
        key=key,
        site_number=site_number,
        roster=roster,
        data=data,
        base_model=base_model,
        work_dir=work_dir,
        runtime_port=runtime_port,
    )


def _run_site(
    *,
    superlink: str,
    ca: Path,
    key: Path,
    site_number: int,
    roster: Path,
    data: Path,
    base_model: Path,
    work_dir: Path,
    runtime_port: int,
    heartbeat: tuple[float, object] | None = None,
) -> None:
    """The SuperNode with this site's settings, until it ends or this process is stopped; `heartbeat`
    (seconds, callable) is called that often meanwhile (a joined site's signed check-in)."""
    from adaptery.federated import deploy
    from adaptery.federated.apps import SiteConfig, load_roster

    members = load_roster(roster)
    if site_number not in members:
        raise typer.BadParameter(f"site {site_number} is not in {roster}", param_hint="--site")
    if deploy.public_key_of(key).split()[:2] != json.loads(roster.read_text())[str(site_number)].split()[:2]:
        raise typer.BadParameter(f"{key} is not the key the roster lists for site {site_number}", param_hint="--key")
    work_dir = work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    config = SiteConfig(
        site=site_number,
        key_path=str(key.resolve()),
        roster_path=str(roster.resolve()),
        data_path=str(data.resolve()),
        base_dir=str(base_model.resolve()),
        work_dir=str(work_dir / "contributions"),
    )
    config.save(work_dir / "site.json")
    node = deploy.start_supernode(
        work_dir / "flwr", superlink, ca.resolve(), key.resolve(), work_dir / "site.json", runtime_port,
        work_dir / "supernode.log",
    )  # fmt: skip
    console.print(f"Site {site_number} connected to {superlink}; log: {work_dir / 'supernode.log'}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the SuperNode and its app processes too
    try:
        every, beat = heartbeat or (None, None)
        while node.poll() is None:
            try:
                node.wait(timeout=every)
            except subprocess.TimeoutExpired:
                _beat(beat)
    except KeyboardInterrupt:
        pass
    finally:
        deploy.stop_flower(work_dir / "flwr")


def _reported(report, event: dict) -> None:  # noqa: ANN001 - the reporting callable
    """The platform's record is for watching: a refused or lost report is said, and the rounds run on."""
    import httpx

    try:
        report(event)
    except typer.Exit:  # refused: the error is printed above
        console.print("[yellow]the platform did not take this progress report; the rounds go on[/yellow]")
    except httpx.HTTPError as error:
        console.print(f"[yellow]the platform did not take this progress report ({error}); the rounds go on[/yellow]")


def _beat(beat) -> None:  # noqa: ANN001 - the heartbeat callable
    """A check-in that fails (the platform restarting, a network blip) is reported, not fatal: the rounds run on."""
    import httpx

    from adaptery.federated.join import JoinError

    try:
        beat()
    except (JoinError, httpx.HTTPError) as error:
        console.print(f"[yellow]check-in failed: {error}[/yellow]")


# ---------------------------------------------------------------------------------------------
# Split fine-tuning (adaptery.federated.split): NOT private, the coordinator sees the site's text.


def _address(value: str, option: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise typer.BadParameter(f"{value!r} is not HOST:PORT", param_hint=option)
    return host, int(port)


def _split_key(path: Path) -> bytes:
    key = path.read_text().strip()
    if len(key) < 32:
        raise typer.BadParameter(
            f"{path} holds {len(key)} characters: a key needs at least 32", param_hint="--key-file"
        )
    return key.encode()


def _fresh_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise typer.BadParameter(f"{out} is not empty: choose another --out", param_hint="--out")


@federated_app.command("split-coordinator")
def split_coordinator(
    base_model: Annotated[Path, typer.Option(exists=True, file_okay=False, help="The base model's directory")],
    key_file: Annotated[Path, typer.Option(help="The shared secret sites authenticate with (made here if missing)")],
    out: Annotated[Path, typer.Option(help="Where the whole adapter is written at the end")],
    listen: Annotated[
        str, typer.Option(help="HOST:PORT to listen on (tunnel it through TLS or SSH)")
    ] = "127.0.0.1:9095",
    split_layer: Annotated[int, typer.Option(help="Decoder layers that run on the site")] = 1,
    lora: Annotated[str, typer.Option(help="LoRA settings as JSON: rank, alpha, seed, learning_rate")] = "{}",
) -> None:
    """Run the later layers of split fine-tuning for one site, then write the assembled adapter. NOT private:
    the site's activations reveal its text to this side (see the README)."""
    import secrets

    from transformers import AutoConfig

    from adaptery.federated.split import SplitConfig

    address = _address(listen, "--listen")
    _fresh_out(out)
    try:
        config = SplitConfig.from_dict({**json.loads(lora), "split_layer": split_layer})
    except (ValueError, TypeError) as error:
        raise typer.BadParameter(str(error), param_hint="--lora") from error
    layers = AutoConfig.from_pretrained(base_model, local_files_only=True, trust_remote_code=False).num_hidden_layers
    try:
        config.check(layers)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--split-layer") from error
    if not key_file.exists():
        key_file.touch(mode=0o600)
        key_file.write_text(secrets.token_hex(32) + "\n")
        console.print(f"New key in {key_file}: give it to the site out of band")
    _serve_split(base_model, config, address, _split_key(key_file), out)


def _serve_split(base_model: Path, config, address: tuple[str, int], authkey: bytes, out: Path) -> None:  # noqa: ANN001
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from adaptery.federated.lora import save_adapter
    from adaptery.federated.split import SplitCoordinator, serve

    coordinator = SplitCoordinator(base_model, config)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console) as progress:
        task = progress.add_task("waiting for the site")

        class Counting:  # serve's view of the coordinator: each answer moves the progress on
            def handle(self, message: bytes) -> bytes:
                answer = coordinator.handle(message)
                progress.update(task, description=f"steps answered: {coordinator.steps}")
                return answer

        def ready(port: int) -> None:
            progress.console.print(f"Split coordinator listening on {address[0]}:{port} (layers {config.split_layer}+)")

        serve(Counting(), address, authkey, ready, until=lambda: coordinator.finished)
    path = save_adapter(coordinator.model, out)
    console.print(f"{coordinator.steps} steps; adapter: {path}")


@federated_app.command("split-site")
def split_site(
    coordinator_address: Annotated[str, typer.Option("--coordinator", help="The split coordinator, HOST:PORT")],
    key_file: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="The coordinator's shared secret")],
    data: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Local chat JSONL (its text is NOT hidden)")],
    base_model: Annotated[Path, typer.Option(exists=True, file_okay=False, help="The base model's directory")],
    out: Annotated[Path, typer.Option(help="Where the whole adapter is written at the end")],
    epochs: Annotated[int, typer.Option(min=1)] = 1,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    max_seq_length: Annotated[int, typer.Option(min=8)] = 256,
    seed: Annotated[int, typer.Option(help="Shuffles the examples")] = 0,
) -> None:
    """Train the first layers and the head here, the rest on the coordinator; write the assembled adapter.
    Token ids and labels stay here, but the activations sent reveal the text: use only where the coordinator
    may see the data."""
    from multiprocessing import AuthenticationError

    from transformers import AutoTokenizer

    from adaptery.federated.split import SplitError, connect, hello
    from adaptery.training.data import load_chat_dataset

    address = _address(coordinator_address, "--coordinator")
    authkey = _split_key(key_file)
    _fresh_out(out)
    tokenizer = AutoTokenizer.from_pretrained(base_model, local_files_only=True, trust_remote_code=False)
    try:  # the federated site's reader: the same validation and the same errors
        examples = load_chat_dataset(data, tokenizer, max_seq_length=max_seq_length).examples
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--data") from error
    try:
        exchange, close = connect(address, authkey)
    except AuthenticationError as error:
        console.print(f"[red]The coordinator at {coordinator_address} refused the key in {key_file}[/red]")
        raise typer.Exit(1) from error
    except OSError as error:
        console.print(f"[red]Cannot reach the coordinator at {coordinator_address}: {error}[/red]")
        raise typer.Exit(1) from error
    try:
        config = hello(exchange, base_model)
        model = _train_split(exchange, config, base_model, examples, epochs, batch_size, seed)
    except (SplitError, EOFError, OSError) as error:
        console.print(f"[red]Split training stopped: {error or 'the coordinator went away'}[/red]")
        raise typer.Exit(1) from error
    finally:
        close()
    from adaptery.federated.lora import save_adapter

    console.print(f"Adapter: {save_adapter(model, out)}")


def _train_split(exchange, config, base_model: Path, examples: list[dict], epochs: int, batch_size: int, seed: int):  # noqa: ANN001, ANN202
    """`epochs` passes over the shuffled examples; the site's model, holding the whole adapter at the end."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from adaptery.federated.split import SplitSite

    site = SplitSite(base_model, config, exchange)
    pad = site.model.config.pad_token_id or 0
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(examples) // batch_size)
    columns = (TextColumn("split training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=steps, loss="-")
        for _ in range(epochs):
            order = torch.randperm(len(examples), generator=generator).tolist()
            for start in range(0, len(order), batch_size):
                batch = [examples[i] for i in order[start : start + batch_size]]
                longest = max(len(e["input_ids"]) for e in batch)
                loss = site.step(
                    torch.tensor([e["input_ids"] + [pad] * (longest - len(e["input_ids"])) for e in batch]),
                    torch.tensor([e["attention_mask"] + [0] * (longest - len(e["input_ids"])) for e in batch]),
                    torch.tensor([e["labels"] + [-100] * (longest - len(e["labels"])) for e in batch]),
                )
                progress.update(task, advance=1, loss=f"{loss:.4f}")
    console.print(f"{steps} steps, last loss {loss:.4f}")
    site.finish()
    return site.model
