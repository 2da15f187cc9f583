"""How `arbiter bench gpu`'s figures compare with the sim's H100 calibration (docs/sim-gpu.md,
../shared/calibration/), as rows of (figure, measured, sim/H100, note), printed and written as markdown.

Comparisons are only like for like: absolute times against the H100 only for the `full` preset's shapes
(Llama-3-8B, SD 1.5) on a CUDA device; ratios (chat beside diffusion / alone) for any CUDA preset. On the
CPU every row is marked n/a: the CPU run checks that the path works, not the physics."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from workers import simprofile as prof

# H100 anchors (calibration): chat decode slowed by a UNet beside it; the UNet slowed by the decode
CHAT_RATIO = {"512": 1.75, "1024": 2.50}
UNET_RATIO = {"512": 1.41, "1024": 2.02}
EAGER_DECODE_MS = {"full": 71.46, "quick": 63.24}     # transformers generate() on the H100 VM (launch-bound)
NVML_MEM_INFO_US = 9.6


def _get(d: Any, *path: str) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _r(x: Any, digits: int = 2) -> Any:
    return round(x, digits) if isinstance(x, (int, float)) else x


def compare(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows: figure, measured, sim (H100 calibration), ratio measured/sim where comparable, note."""
    cuda, preset = data["device"] == "cuda", data["preset"]
    full = cuda and preset == "full"
    llm = prof.LLM_VARIANTS["llama-8b" if preset == "full" else "llama-1b"]
    rows: list[dict[str, Any]] = []

    def row(figure: str, measured: Any, sim: Any, comparable: bool, note: str = "") -> None:
        ok = comparable and isinstance(measured, (int, float)) and isinstance(sim, (int, float)) and sim
        rows.append({"figure": figure, "measured": _r(measured), "sim": sim if comparable else None,
                     "ratio": _r(measured / sim) if ok else None,
                     "note": note if comparable else "n/a: " + ("the calibration is an H100's" if not cuda
                                                                  else "other shapes than the calibration's")})

    for pol in ("priority", "arbiter"):
        for side, anchor in zip(data["sides"], ("512", "1024"), strict=False):
            m = _get(data, f"stack_{pol}", "contention", "beside", str(side), "ratio_to_alone")
            expect = CHAT_RATIO[anchor] if pol == "priority" else 1.0
            row(f"chat per token beside {side} px diffusion / alone ({pol})", m, expect, cuda,
                "H100 time-slicing anchor" if pol == "priority" else "sim: background paused while chat runs")
    for side, anchor in zip(data["sides"], ("512", "1024"), strict=False):
        st = _get(data, "stack_priority", "contention", "beside", str(side))
        m = (st["diffusion_ms_per_step_beside_chat"] / st["diffusion_ms_per_step_alone"]
             if st and st.get("diffusion_ms_per_step_beside_chat") and st.get("diffusion_ms_per_step_alone") else None)
        row(f"diffusion step beside chat / alone, {side} px (priority)", m, UNET_RATIO[anchor], cuda)
        row(f"diffusion step ms, {side} px (in process)", _get(data, "diffusion", str(side), "step_ms"),
            prof.diffusion_step_ms(side, side), full, "sim: SD 1.5 shape, one image with CFG")
    row("llm decode ms/token (backend loop, eager)", _get(data, "llm", "decode_ms_per_token"), llm.ms_per_token, cuda,
        f"sim: GPU-bound (CUDA graphs); eager generate() on the H100 VM was {EAGER_DECODE_MS.get(preset, '-')} ms")
    row(f"llm prefill ms ({_get(data, 'llm', 'prefill_tokens')} tokens)", _get(data, "llm", "prefill_ms"),
        llm.prefill_ms, cuda)
    row("llm weights MiB", _get(data, "loads", "llm", "weights_allocated_mib"), llm.weights_mib, cuda)
    row("diffusion weights MiB", _get(data, "loads", "diffusion", "weights_allocated_mib"),
        prof.DIFFUSION_WEIGHTS_MIB, full)
    for side in data["sides"]:
        top = (_get(data, "diffusion", str(side), "rungs") or [{}])[0]
        row(f"diffusion job VRAM over weights, {side} px (MiB)", top.get("measured_mib"),
            prof.diffusion_activation_mib(side, side), full, f"registry estimate {top.get('estimate_mib')} MiB")
    row("NVML memory query µs", _get(data, "nvml", "mem_info_us"), NVML_MEM_INFO_US, cuda)
    pre = _get(data, "stack_arbiter", "preemption") or {}
    step = _get(data, "diffusion", str(data["sides"][0]), "step_ms")
    row("preemption: interactive submit -> started ms", pre.get("submit_to_start_ms_p50"),
        round(step + 100, 1) if isinstance(step, (int, float)) else None, True,
        "target: one diffusion step + 100 ms (step measured here)")
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:g}" if isinstance(v, float) else str(v)


def sections(data: dict[str, Any]) -> list[tuple[str, list[tuple[str, Any]]]]:
    """Every measured figure, grouped, as (label, value) pairs; a failed section shows its error."""
    out: list[tuple[str, list[tuple[str, Any]]]] = []

    def flat(prefix: str, d: Any) -> list[tuple[str, Any]]:
        if not isinstance(d, dict):
            return [(prefix, d)]
        rows = []
        for k, v in d.items():
            if k in ("where", "logs", "trials", "registry"):
                continue
            if isinstance(v, list) and v and isinstance(v[0], dict):
                for i, item in enumerate(v):
                    rows += flat(f"{prefix}{k}[{i}].", item)
            else:
                rows += flat(f"{prefix}{k}.", v) if isinstance(v, dict) else [(f"{prefix}{k}", v)]
        return rows

    for name in ("build", "nvml", "loads", "llm", "diffusion", "stack_priority", "stack_arbiter"):
        if name in data:
            out.append((name, flat("", data[name])))
    return out


def markdown(data: dict[str, Any]) -> str:
    t = data.get("torch", {})
    lines = [f"# arbiter bench gpu: {t.get('device_name', data['device'])}, preset {data['preset']}", "",
             (f"{data['models'].get('llm')}; {data['models'].get('diffusion')}. torch {t.get('torch')} "
             f"(CUDA {t.get('cuda')}), transformers {t.get('transformers')}, diffusers {t.get('diffusers')}. "
             f"Run took {data.get('wall_s')} s, {data['machine'].get('when')}."), "",
             "## Against the sim's calibration (H100)", "",
             "| figure | measured | sim / H100 | measured ÷ sim | note |", "|---|---|---|---|---|"]
    for r in data.get("calibration") or compare(data):
        lines.append(f"| {r['figure']} | {_cell(r['measured'])} | {_cell(r['sim'])} | {_cell(r['ratio'])} | {r['note']} |")
    for name, rows in sections(data):
        lines += ["", f"## {name}", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def print_report(console: Console, data: dict[str, Any]) -> None:
    t = Table(title=f"bench gpu: {data.get('torch', {}).get('device_name', data['device'])}, preset {data['preset']}")
    for col in ("figure", "measured", "sim / H100", "÷ sim", "note"):
        t.add_column(col, justify="left" if col in ("figure", "note") else "right")
    for r in data.get("calibration") or compare(data):
        t.add_row(r["figure"], _cell(r["measured"]), _cell(r["sim"]), _cell(r["ratio"]), r["note"])
    console.print(t)
    failed = [k for k, v in data.items() if isinstance(v, dict) and ("error" in v or "skipped" in v)]
    for name in ("stack_priority", "stack_arbiter"):
        for k, v in (data.get(name) or {}).items():
            if isinstance(v, dict) and ("error" in v or "skipped" in v):
                failed.append(f"{name}.{k}")
    if failed:
        console.print(f"[yellow]failed or skipped: {', '.join(failed)} (see gpu.json)[/yellow]")
