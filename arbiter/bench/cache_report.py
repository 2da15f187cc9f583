"""The table `arbiter bench cache` prints."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _s(x: dict[str, float], unit: str = "") -> str:
    return f"{x['median']:.2f}{unit} ({x['min']:.2f}–{x['max']:.2f})"


def cache_table(console: Console, data: dict[str, Any]) -> None:
    t = Table(title=f"cache: {data['model_bytes'] / 1e9:.2f} GB model, {data['fragments']} fragments of "
                    f"{data['fragment_mib']} MiB, {data['rounds']} interleaved rounds; median (min–max)")
    for col in ("load", "ours GB/s", "raw GB/s", "ours / raw", "target", "verdict"):
        t.add_column(col, justify="left" if col in ("load", "verdict") else "right")
    names = {"cold": "cold: origin (mapped, xxh3; tiers behind)", "disk": "warm from disk (mapped, checked)",
             "ram": "warm from RAM, every byte copied"}
    for key, label in names.items():
        m = data[key]
        t.add_row(label, _s(m["ours_gbps"]), _s(m["raw_gbps"]), _s(m["ratio"], "×"), f"≥ {m['target']}×", m["verdict"])
    console.print(t)
    for key in names:
        console.print(f"raw {key}: {data['raw'][key]}")
    console.print(f"RAM hit, mapped only (no copy): {_s(data['ram']['mapped_only_gbps'])} GB/s; a cold load "
                  f"was stored in RAM and on disk {_s(data['cold']['stored_behind_s'])} s after it returned")
    m = data.get("model")
    if m and "skipped" in m:
        console.print(f"real model: skipped; {m['skipped']}", markup=False, highlight=False)
    elif m:
        for case, what in (("cold_dir", "its page cache dropped"), ("warm_dir", "in the page cache")):
            r = m[case]
            console.print(f"real model ({m['model_bytes'] / 1e9:.2f} GB GPT-2, random weights), ready to run (built + "
                          f"first token): ours from the RAM tier {_s(r['ours_s'])} s vs from_pretrained from the "
                          f"model directory, {what}, {_s(r['from_pretrained_s'])} s = {_s(r['speedup'], '×')} "
                          f"(target ≥ 2×: {r['verdict']})")
        console.print(f"same tensors: {m['same_tensors']}, same logits: {m['same_logits']}")
    c = data["cluster"]
    console.print(f"{c['nodes']} nodes loading it at once: {c['origin_fetches_per_fragment']} origin fetches per "
                  f"fragment across the cluster ({c['peer_fetches']} fragments from peers, {c['peer_failures']} "
                  f"peer failures); all held it after {c['all_nodes_s']:.2f} s (slowest node {c['slowest_node_s']:.2f} s)")
