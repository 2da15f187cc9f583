"""`arbiter cache`: the fragment cache."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from arbiter.cli.common import console
from arbiter.cli.help import App
from broker.settings import get_settings

app = App(no_args_is_help=True, help="The fragment cache (model weights in tiers).")


@app.command("status")
def cache_status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Per node and tier: bytes used / budget, fragments, hits, misses, bytes loaded, GB/s; resident models."""
    from rich.table import Table

    from broker.keys import Keys
    from broker.redis_server import connect
    from cache.status import collect

    s = get_settings()
    r = connect(s.redis_url, retry_s=s.redis_client_retry_s, master_name=s.redis_master_name)
    data = collect(r, Keys(s.key_prefix))
    if as_json:
        console.print_json(json.dumps(data))
        return
    t = Table(title="Fragment cache")
    for col in ("node", "tier", "used / budget MiB", "fragments", "hits", "misses", "loaded MiB", "GB/s"):
        t.add_column(col, justify="left" if col in ("node", "tier") else "right")
    def mib(v):
        return "-" if v is None else f"{v / 2**20:.0f}"
    for node, info in data["nodes"].items():
        for tier, v in info["tiers"].items():
            t.add_row(node, tier, f"{mib(v['used_bytes'])} / {mib(v['budget_bytes'])}", str(v["fragments"] or "-"),
                      str(v["hits"]), str(v["misses"]), mib(v["bytes_loaded"]), str(v["gb_per_s"] or "-"))
    console.print(t)
    for gpu, models in data["resident"].items():
        console.print(f"{gpu}: " + ", ".join(models))
