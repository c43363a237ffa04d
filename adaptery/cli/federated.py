"""`adaptery federated ...`: run a federation's coordinator, or one site next to its own data.

    adaptery federated keygen site.key                     # each site, once: send site.pub to the coordinator
    adaptery federated coordinator --roster roster.json --base-model DIR --work-dir coord --rounds 3 \\
        --threshold 2 --register-base adaptery-demo        # SuperLink (TLS, node auth) + the rounds
    adaptery federated site --superlink HOST:PORT --ca coord/tls/ca.pem --key site.key --site 1 \\
        --roster roster.json --data local.jsonl --base-model DIR --work-dir site1

The roster (`{"1": "<site 1's site.pub>", ...}`) is agreed out of band and every site holds the same
file: a site checks the other sites' signed keys against its own copy, never against the coordinator's.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

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
    roster: Annotated[Path, typer.Option(exists=True, help='JSON {"site number": "OpenSSH public key"}')],
    base_model: Annotated[Path, typer.Option(exists=True, file_okay=False, help="The base model's directory")],
    work_dir: Annotated[Path, typer.Option(help="Flower state, TLS files, transcript and the adapter")],
    rounds: Annotated[int, typer.Option(min=1)] = 3,
    threshold: Annotated[int | None, typer.Option(help="Sites needed to finish a round [default: a majority]")] = None,
    host: str = "127.0.0.1",
    port: int = 9093,
    lora: Annotated[str, typer.Option(help='Recipe overrides as JSON, e.g. {"head_fraction": 0.25}')] = "{}",
    stage_timeout: float = 60.0,
    register_base: Annotated[str | None, typer.Option(help="Import the result into the platform on this base")] = None,
    suffix: Annotated[str | None, typer.Option(help="Suffix of the imported adapter's name")] = None,
) -> None:
    """Start a SuperLink (TLS, only registered site keys admitted), run the rounds, write the adapter."""
    from adaptery.federated import deploy
    from adaptery.federated.apps import CoordinatorJob
    from adaptery.federated.config import FederatedLoraConfig
    from adaptery.federated.secagg import check_params

    sites = _check_roster(roster)
    threshold = threshold or sites // 2 + 1
    try:
        check_params(sites, threshold)
        recipe = FederatedLoraConfig.from_dict(json.loads(lora))
    except (ValueError, TypeError) as error:
        raise typer.BadParameter(str(error)) from error
    work_dir = work_dir.resolve()
    home, out = work_dir / "flwr", work_dir / "out"
    if out.exists() and any(out.iterdir()):
        raise typer.BadParameter(f"{out} holds an earlier run: choose another --work-dir", param_hint="--work-dir")
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
    work_dir.mkdir(parents=True, exist_ok=True)
    job.save(work_dir / "job.json")
    link = deploy.start_superlink(home, host, port, work_dir / "tls", work_dir / "superlink.log")
    try:
        deploy.wait_listening(host, port, link, timeout=120)
        keys = []
        for site, key in json.loads(roster.read_text()).items():
            path = work_dir / "keys" / f"site-{site}.pub"
            path.parent.mkdir(exist_ok=True)
            path.write_text(key.strip() + "\n")
            keys.append(path)
        deploy.register_sites(home, keys)
        console.print(f"SuperLink at {host}:{port}; sites verify it with {work_dir / 'tls' / 'ca.pem'}")
        run_id = deploy.start_run(home, deploy.write_app(work_dir / "app"), work_dir / "job.json")
        console.print(f"Run {run_id}: waiting for {sites} sites, then {rounds} rounds (threshold {threshold})")
        adapter = _follow(out)
    finally:
        deploy.stop_flower(home)
    console.print(f"Adapter: {adapter}")
    if register_base:
        from adaptery.cli.main import import_model

        import_model(adapter, base=register_base, suffix=suffix)


def _follow(out: Path) -> Path:
    from adaptery.federated import deploy

    shown = 0
    while True:
        events = deploy.read_progress(out)
        for event in events[shown:]:
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
        node.wait()
    except KeyboardInterrupt:
        pass
    finally:
        deploy.stop_flower(work_dir / "flwr")
