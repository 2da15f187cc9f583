"""`arbiter keys`: the gateway's API keys (stored hashed in Redis)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from arbiter.cli.common import console, open_client
from arbiter.cli.help import App
from arbiter.gateway.apikeys import MAX_WAITS
from broker.errors import InvalidJob

app = App(no_args_is_help=True, help="API keys for the gateway (stored hashed in Redis).")


@app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="A name for the key (a label: its owner or use).")],
    tenant: Annotated[str | None, typer.Option(help="The tenant its jobs belong to (letters, digits, _ . @ -); keys "
                                                    "of one tenant share their jobs and fair share. Default: a new "
                                                    "tenant of its own (the key's id).")] = None,
    priorities: Annotated[str, typer.Option(help="Comma-separated priorities it may use.")] = "standard,background",
    default: Annotated[str | None, typer.Option(help="Priority when a request names none (default: the lowest).")] = None,
    rate: Annotated[int, typer.Option(min=0, help="Requests per minute (0: unlimited).")] = 600,
    max_queued: Annotated[int, typer.Option(min=0, help="Jobs waiting or running at once (0: unlimited).")] = 1000,
    max_waits: Annotated[int, typer.Option(min=0, help="Requests waiting on jobs at once: event streams and "
                                                       "non-streaming chat/image requests (0: unlimited).")] = MAX_WAITS,
    admin: Annotated[bool, typer.Option(help="May also use the operators' endpoints (/v1/admin/...: pause, drain, "
                                             "resume queues; bump and reprioritize jobs).")] = False,
) -> None:
    """Create a key and print it (once: only its hash is stored); its id and tenant go to stderr."""
    from arbiter.gateway.apikeys import KeyStore

    with open_client() as client:
        try:
            secret, key = KeyStore(client.redis, client.keys).issue(
                name, [p.strip() for p in priorities.split(",") if p.strip()], default, rate, max_queued, admin,
                tenant, max_waits)
        except ValueError as exc:
            raise InvalidJob(str(exc)) from None
    print(f"key {key.id} ({key.name!r}), tenant {key.tenant}", file=sys.stderr)
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

    t = Table("id", "name", "tenant", "prefix", "priorities", "default", "rate/min", "max queued", "max waits",
              "admin")
    for k in keys:
        t.add_row(k.id, k.name, k.tenant, k.prefix + "…", ",".join(k.priorities), k.default_priority,
                  str(k.rate_per_min), str(k.max_queued), str(k.max_waits), "yes" if k.admin else "")
    console.print(t)


@app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's id, or its name.")]) -> None:
    """Revoke a key at once. Its jobs stay its tenant's (admin keys read them); its id is never issued again."""
    from arbiter.gateway.apikeys import KeyStore

    with open_client() as client:
        key = KeyStore(client.redis, client.keys).revoke(name)
        if key is None:
            raise InvalidJob(f"no key with id or name {name!r}")
    print(f"revoked {key.id} ({key.name!r}, tenant {key.tenant})")
