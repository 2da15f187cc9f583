"""Tables (rich) and plots (matplotlib, headless) of the benchmark results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _f(v: Any, digits: int = 2, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def mixed_table(console: Console, data: dict[str, Any]) -> None:
    pols = data["policies"]
    t = Table(title=f"mixed: chat vs batch flood ({data['duration_s']:.0f} s trace, scale {data['scale']}, "
                    f"{data['gpu']}, trace {data['trace']})")
    t.add_column("metric", no_wrap=True)
    for p in pols:
        t.add_column(p, justify="right")
    rows = [
        ("interactive SLO attainment", lambda r: _f(r["interactive"]["slo_attainment"] and r["interactive"]["slo_attainment"] * 100, 1, " %")),
        ("interactive latency p50 / p95 / p99 s", lambda r: " / ".join(_f(r["interactive"][k]) for k in ("latency_p50_s", "latency_p95_s", "latency_p99_s"))),
        ("time to first token p50 / p95 / p99 s", lambda r: " / ".join(_f(r["interactive"].get(k)) for k in ("ttft_p50_s", "ttft_p95_s", "ttft_p99_s"))),
        ("chat TTFT p95 ÷ idle TTFT (idle s)", lambda r: f"{_f(r['interactive'].get('ttft_p95_vs_idle'), 2, '×')} ({_f(r.get('idle_ttft_s'), 3)})"),
        ("chat ms/token p50 (idle)", lambda r: f"{_f(r['interactive']['ms_per_token_p50'])} ({_f(r['idle_ms_per_token'])})"),
        ("chat per-token ÷ idle", lambda r: _f(r["interactive"]["per_token_vs_idle"], 2, "×")),
        ("background images/min", lambda r: _f(r["background"]["images_per_min"], 1)),
        ("background Σquality/min", lambda r: _f(r["background"]["quality_per_min"], 1)),
        ("mean quality llm.int / llm.std / diff.bg", lambda r: " / ".join(_f(r["quality"].get(k)) for k in ("llm.interactive", "llm.standard", "diffusion.background"))),
        ("simulated OOMs", lambda r: str(r["ooms"])),
        ("preemptions / pauses", lambda r: f"{r['preemptions']} / {r['pauses']}"),
        ("submitted / finished / failed / lost", lambda r: f"{r['submitted']} / {r['finished']} / {r['failed']} / {r['lost']}"),
        ("GPU busy fraction", lambda r: _f(r["gpu_busy_fraction"])),
        ("decision p99 µs", lambda r: _f(r["plan_us_p99"], 0)),
    ]
    for name, fn in rows:
        t.add_row(name, *(fn(r) for r in pols.values()))
    console.print(t)


def dispatch_table(console: Console, data: dict[str, Any]) -> None:
    t = Table(title=f"dispatch: no-op jobs, {data['burst']} in a burst, {data['latency_samples']} one at a time, "
                    f"-c {data['concurrency']}")
    for col in ("", "jobs/s", "submits/s", "submit→start p50 ms", "p99 ms", "Redis commands/job"):
        t.add_column(col, justify="right" if col else "left")
    for name in ("arbiter", "bare_celery"):
        r = data[name]
        t.add_row(name, _f(r["jobs_per_s"], 0), _f(r["submit_per_s"], 0), _f(r["start_p50_ms"]), _f(r["start_p99_ms"]),
                  _f(r.get("redis_commands_per_job"), 1))
    t.add_row("ratio", _f(data["throughput_ratio"], 2, "×"), "", _f(data["start_p50_ratio"], 2, "×"),
              _f(data["start_p99_ratio"], 2, "×"), "")
    console.print(t)
    console.print(f"scheduling decision (plan) p99: {data['plan_us_p99']:.0f} µs")


def preempt_table(console: Console, data: dict[str, Any]) -> None:
    t = Table(title=f"preempt: {data['measured']}/{data['trials']} trials, diffusion step {data['step_ms']:.0f} ms, "
                    f"target ≤ {data['target_ms']:.0f} ms")
    for col in ("from interactive submit to", "p50 ms", "p99 ms"):
        t.add_column(col, justify="right" if "ms" in col else "left")
    for name, key in (("background lease released", "to_lease_release_ms"),
                      ("interactive job started", "to_interactive_start_ms")):
        t.add_row(name, _f(data[key]["p50"], 1), _f(data[key]["p99"], 1))
    console.print(t)
    c = data.get("checkpoint")
    if c and c["checkpoints"]:
        console.print(f"periodic checkpoints: {c['checkpoints']} every {c['interval_s']:g} s of work, "
                      f"{c['mean_ms']:.2f} ms each, {100 * c['overhead']:.3f} % of step time; at the default "
                      f"{c['default_interval_s']:g} s: {100 * c['overhead_at_default']:.3f} %")


def cache_table(console: Console, data: dict[str, Any]) -> None:
    t = Table(title=f"cache: {data['model_bytes'] / 1e9:.2f} GB model, {data['fragments']} fragments of "
                    f"{data['fragment_mib']} MiB; page cache {data['page_cache']}")
    for col in ("load", "GB/s", "raw, same medium, GB/s", "ratio"):
        t.add_column(col, justify="left" if col == "load" else "right")
    t.add_row("cold: origin -> disk + RAM", _f(data["cold_gbps"]), _f(data["raw_origin_read_gbps"]),
              _f(data["cold_gbps"] / data["raw_origin_read_gbps"], 2, "×"))
    t.add_row("warm from disk (-> RAM)", _f(data["warm_disk_gbps"]), _f(data["raw_disk_read_gbps"]),
              _f(data["disk_vs_raw"], 2, "×"))
    t.add_row("warm from RAM, mapped", _f(data["warm_ram_map_gbps"]), "", "")
    t.add_row("warm from RAM, every byte copied", _f(data["warm_ram_copy_gbps"]), _f(data["raw_memcpy_gbps"]),
              _f(data["ram_copy_vs_memcpy"], 2, "×"))
    console.print(t)
    console.print(f"plain writes of the same bytes, new files: /dev/shm {data['raw_write_ram_gbps']:.2f} GB/s, "
                  f"disk {data['raw_write_disk_gbps']:.2f} GB/s (a tier fill is at least a write)")
    d = data["disk_store"]
    console.print(f"disk store, 32 MiB blobs: diskcache write {d['diskcache_write_gbps']:.2f} / read "
                  f"{d['diskcache_read_gbps']:.2f} GB/s; files write {d['files_write_gbps']:.2f} / read "
                  f"{d['files_read_gbps']:.2f} GB/s")
    console.print(f"{data['processes']} processes loading it at once (cold): {data['origin_fetches_per_fragment']} "
                  f"origin fetches per fragment; all held it after {data['all_processes_s']:.2f} s "
                  f"(slowest {data['slowest_process_s']:.2f} s) vs one alone {data['one_process_cold_s']:.2f} s")


def plot(path: Path, data: dict[str, Any]) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    if data["scenario"] == "mixed":
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for name, r in data["policies"].items():
            xs = r["latencies_s"]
            if xs:
                a.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
        a.set_xscale("log")
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        a.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        a.set_xlabel("interactive chat latency, s (log; finished chats)")
        a.set_ylabel("fraction of chats")
        a.legend()
        a.set_title("chat latency CDF")
        names = list(data["policies"])
        imgs = [data["policies"][n]["background"]["images_per_min"] for n in names]
        qual = [data["policies"][n]["background"]["quality_per_min"] for n in names]
        x = range(len(names))
        b.bar([i - 0.2 for i in x], imgs, 0.4, label="images/min")
        b.bar([i + 0.2 for i in x], qual, 0.4, label="Σquality/min")
        b.set_xticks(list(x), names)
        b.set_title("background throughput")
        b.legend()
    elif data["scenario"] == "dispatch":
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
        names = ["arbiter", "bare_celery"]
        a.bar(names, [data[n]["jobs_per_s"] for n in names])
        a.set_title("burst throughput, jobs/s")
        b.bar([f"{n} p50" for n in names] + [f"{n} p99" for n in names],
              [data[n]["start_p50_ms"] for n in names] + [data[n]["start_p99_ms"] for n in names])
        b.set_title("submit→start, ms")
        b.tick_params(axis="x", rotation=20)
    else:
        fig, a = plt.subplots(figsize=(6, 3.5))
        a.hist([data["samples_ms"]["release"], data["samples_ms"]["start"]], bins=20,
               label=["lease released", "interactive started"])
        a.axvline(data["target_ms"], color="k", linestyle="--", label="target")
        a.set_xlabel("ms after the interactive submit")
        a.legend()
        a.set_title("preemption latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def affinity_table(console: Console, data: dict[str, Any]) -> None:
    t = Table(title=f"affinity: {data['jobs']} LLM jobs on {' + '.join(data['models'])}, two llm workers "
                    f"({', '.join(data['workers'])}), {data['per_s']}/s, scale {data['scale']}")
    t.add_column("metric", no_wrap=True)
    for r in data["runs"]:
        t.add_column("affinity on" if r["affinity"] else "affinity off", justify="right")
    rows = [
        ("model loads", "model_loads", 0), ("seconds loading (H100 time)", "load_seconds", 1),
        ("jobs passed to a peer", "passed_on", 0), ("latency p50 s", "latency_p50_s", 2),
        ("latency p95 s", "latency_p95_s", 2), ("latency p99 s", "latency_p99_s", 2),
        ("origin fetches / RAM hits / disk hits", None, 0), ("finished / failed", None, 0),
    ]
    for label, key, digits in rows:
        if key:
            t.add_row(label, *(_f(r[key], digits) for r in data["runs"]))
        elif label.startswith("origin"):
            t.add_row(label, *(f"{r['origin_fetches']} / {r['ram_hits']} / {r['disk_hits']}" for r in data["runs"]))
        else:
            t.add_row(label, *(f"{r['finished']} / {r['failed']}" for r in data["runs"]))
    console.print(t)
    console.print(f"loads saved by affinity: {data['loads_saved']} ({_f(data['loads_ratio'])}× fewer)")


def scale_table(console: Console, data: dict[str, Any]) -> None:
    rows = data["control_plane"]
    t = Table(title=f"scale: the beat alone, {data['ticks']} ticks back to back per size, "
                    f"{data['gpus_per_node']} sim GPUs per node, 2 workers and 2 running jobs per GPU")
    for col in ("GPUs (nodes)", "tick p50 / p99 ms", "plan p50 / p99 ms", "read world ms", "round trips/tick",
                "commands/tick", "KB/tick", "Redis CPU ms/tick", "tick ms per GPU"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(f"{r['gpus']} ({r['nodes']})", f"{_f(r['tick_p50_ms'], 1)} / {_f(r['tick_p99_ms'], 1)}",
                  f"{_f(r['plan_p50_ms'])} / {_f(r['plan_p99_ms'])}", _f(r["read_world_p50_ms"], 1),
                  _f(r["round_trips_per_tick"], 0), _f(r["commands_per_tick"], 0),
                  _f(r["bytes_per_tick"] / 1024, 1), _f(r["redis_usec_per_tick"] / 1000, 2),
                  _f(r["tick_p50_ms"] / r["gpus"], 2))
    console.print(t)
    if any(r["sweeps_in_loop"] for r in rows):
        console.print("note: the periodic sweeps fired inside the timed ticks of "
                      f"{', '.join(str(r['gpus']) for r in rows if r['sweeps_in_loop'])} GPUs (the loop outlasted 5 s)")
    v = data["verdict"]
    growth = ", ".join(f"{k.removesuffix('_per_tick').removesuffix('_ms')} {x:.2f}×"
                       for k, x in v["per_gpu_cost_ratio"].items())
    if growth:
        console.print(f"cost per GPU at {v['to_gpus']} vs {v['from_gpus']} GPUs (≤ 1.00× = linear or better): {growth}")
    for name, g in v["goals"].items():
        console.print(f"goal {name} ≤ {g['goal']}: measured {g['measured']} — {'met' if g['met'] else 'NOT met'}")
    top = rows[-1]
    sw = ", ".join(f"{k} {x['ms']:.1f} ms / {x['commands']} commands" for k, x in top["sweeps"].items())
    console.print(f"periodic sweeps at {top['gpus']} GPUs (every 5-10 s, not in the ticks above): {sw}")
    d = Table(title="dispatch: no-op jobs through one Redis, N single-process workers, burst "
                    f"{data['dispatch'][0]['burst'] if data['dispatch'] else 0}")
    for col in ("workers", "jobs/s", "submits/s", "Redis commands/job", "KB/job"):
        d.add_column(col, justify="right")
    for r in data["dispatch"]:
        d.add_row(str(r["workers"]), _f(r["jobs_per_s"], 0), _f(r["submits_per_s"], 0),
                  _f(r["redis_commands_per_job"], 0), _f(r["redis_bytes_per_job"] / 1024, 1))
    console.print(d)
    console.print(data["note"])


def scale_plot(path: Path, data: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = data["control_plane"]
    gpus = [r["gpus"] for r in rows]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.8))
    a.plot(gpus, [r["tick_p50_ms"] for r in rows], "o-", label="tick p50")
    a.plot(gpus, [r["tick_p99_ms"] for r in rows], "o--", label="tick p99")
    a.plot(gpus, [r["plan_p50_ms"] for r in rows], "s-", label="plan() p50")
    for g, goal in ((64, 50.0), (256, 200.0)):
        a.plot([g], [goal], "kv", label="goal (p99)" if g == 64 else None)
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("sim GPUs")
    a.set_ylabel("ms")
    a.set_title("beat tick cost")
    a.legend(fontsize=8)
    b.plot(gpus, [r["round_trips_per_tick"] for r in rows], "o-", label="round trips")
    b.plot(gpus, [r["commands_per_tick"] for r in rows], "s-", label="commands")
    b.plot(gpus, [r["bytes_per_tick"] / 1024 for r in rows], "^-", label="KB")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("sim GPUs")
    b.set_title("Redis traffic per tick")
    b.legend(fontsize=8)
    ws = [str(r["workers"]) for r in data["dispatch"]]
    c.bar(ws, [r["jobs_per_s"] for r in data["dispatch"]])
    c.set_xlabel("no-op worker processes (one Redis, 2-core box)")
    c.set_title("dispatch, jobs/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fairness_table(console: Console, data: dict[str, Any]) -> None:
    t = Table(title=f"fairness: tenant A {data['a_jobs']} background images at t=0, tenant B {data['b_jobs']} at "
                    f"t={data['b_at_s']:g} s, a chat every {data['chat_every_s']:g} s ({data['gpu']}, "
                    f"{', '.join(data['workers'])}; sim seconds)")
    for col in ("", "B wait p50 s", "B wait p95 s", "A / B GPU share while both wait", "Jain's index",
                "chat SLO", "chat p95 s", "ETA error p50 / p90 (all)", "(B)", "unfinished"):
        t.add_column(col, justify="right" if col else "left")
    for name, r in data["modes"].items():
        share = r["share_while_both"]
        t.add_row(name, _f(r["b_wait_p50_s"], 1), _f(r["b_wait_p95_s"], 1),
                  f"{share.get('A', 0):.2f} / {share.get('B', 0):.2f}", _f(r["jain"], 3),
                  "-" if r["chat_slo"] is None else f"{r['chat_slo'] * 100:.0f} %", _f(r["chat_latency_p95_s"], 2),
                  f"{_f(r['eta_error_p50'], 2)} / {_f(r['eta_error_p90'], 2)}",
                  f"{_f(r.get('eta_error_b_p50'), 2)} / {_f(r.get('eta_error_b_p90'), 2)}", str(r["unfinished"]))
    console.print(t)
    g = data["goals"]
    console.print(f"goals: Jain ≥ 0.95 with fair share: {'met' if g['jain_fair_ge_0_95'] else 'MISSED'}; "
                  f"ETA error p50 ≤ 20 % (B's jobs): {'met' if g['eta_p50_within_20pct'] else 'MISSED'}; "
                  f"B's median wait, fair ÷ fcfs: {g['b_wait_p50_ratio']}")


def gateway_table(console: Console, data: dict[str, Any]) -> None:
    """`arbiter bench gateway`: waiting before (a thread per wait) and now (one event reader per process)."""
    t = Table(title=f"gateway waits: interactive chat TTFT alone vs beside {data['waits']} background waits held "
                    f"by two tenants ({data['gpu']}, {', '.join(data['workers'])})")
    for col in ("", "alone p50 ms", "beside p50 ms", "beside max ms", "beside / alone", "goal ≤ 1.2× + 20 ms"):
        t.add_column(col, justify="right" if col else "left")
    for name, r in data["ttft"].items():
        t.add_row(name, _f(r["alone_p50_ms"], 1), _f(r["beside_p50_ms"], 1), _f(r["beside_max_ms"], 1),
                  _f(r["ratio"], 2), "met" if r["goal_met"] else "MISSED")
    console.print(t)
    s = data["streams_held"]
    t = Table(title=f"streams one process holds ({s['streams']} jobs streamed at once)")
    for col in ("open at once", "RSS per stream KiB", "tokens", "tokens/s", "event XREADs", "goal ≥ 2 000"):
        t.add_column(col, justify="right")
    t.add_row(str(s["open_at_once"]), _f(s["rss_per_stream_kib"], 1), str(s["tokens"]), _f(s["tokens_per_s"], 1),
              str(s["event_reads"]), "met" if s["goal_met"] else "MISSED")
    console.print(t)
    p = data["position"]
    t = Table(title=f"a queued job's position, {p['depth']} jobs ahead (what GET /v1/jobs/{{id}} reads)")
    for col in ("", "place", "p50 ms", "p99 ms", "Redis bytes / read"):
        t.add_column(col, justify="right" if col else "left")
    for name in ("before", "now"):
        r = p[name]
        t.add_row(name, str(r["place"]), _f(r["p50_ms"], 2), _f(r["p99_ms"], 2), f"{r['bytes_per_read']:,}")
    console.print(t)
    console.print(f"goal p99 ≤ 10 ms and ≤ 10 KB: {'met' if p['goal_met'] else 'MISSED'}")
