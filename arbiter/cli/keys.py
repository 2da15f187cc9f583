"""`arbiter keys`: the gateway's API keys (stored hashed in Redis)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from arbiter.cli.common import console, open_client
from arbiter.cli.help import App
from broker.errors import InvalidJob

app = App(no_args_is_help=True, help="API keys for the gateway (stored hashed in Redis).")


@app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="A name for the key (its owner or use).")],
    priorities: Annotated[str, typer.Option(help="Comma-separated priorities it may use.")] = "standard,background",
    default: Annotated[str | None, typer.Option(help="Priority when a request names none (default: the lowest).")] = None,
    rate: Annotated[int, typer.Option(min=0, help="Requests per minute (0: unlimited).")] = 600,
    max_queued: Annotated[int, typer.Option(min=0, help="Jobs waiting or running at once (0: unlimited).")] = 1000,
    admin: Annotated[bool, typer.Option(help="May also use the operators' endpoints (/v1/admin/...: pause, drain, "
                                             "resume queues; bump and reprioritize jobs).")] = False,
) -> None:
    """Create a key and print it (once: only its hash is stored)."""
    from arbiter.gateway.apikeys import KeyStore

    with open_client() as client:
        try:
            secret = KeyStore(client.redis, client.keys).create(
                name, [p.strip() for p in priorities.split(",") if p.strip()], default, rate, max_queued, admin)
        except ValueError as exc:
            raise InvalidJob(str(exc)) from None
    print(secret)


@app.command("list")
def keys_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Keys with their priorities and limits (never the secrets)."""
    from dataclasses import asdict

    from arbiter.gateway.apikeys import KeyStore

    with open_client() as client:
        keys = KeyStore(client.redis, client.keys).list()
    if as_json:
        console.print_json(json.dumps([asdict(k) for k in keys]))
        return
    from rich.table import Table

    t = Table("name", "prefix", "priorities", "default", "rate/min", "max queued", "admin")
    for k in keys:
        t.add_row(k.name, k.prefix + "…", ",".join(k.priorities), k.default_priority, str(k.rate_per_min),
                  str(k.max_queued), "yes" if k.admin else "")
    console.print(t)


@app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Revoke a key at once."""
    from arbiter.gateway.apikeys import KeyStore

    with open_client() as client:
        if not KeyStore(client.redis, client.keys).revoke(name):
            raise InvalidJob(f"no key named {name!r}")
    print(f"revoked {name}")
