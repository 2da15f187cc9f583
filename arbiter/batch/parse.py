"""Reading the input JSONL into lines to submit, and reporting the bad ones (with their line number)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arbiter.batch.output import append

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SPEC_FIELDS = ("workload", "prompt", "model", "priority", "tenant", "min_quality", "deadline_s", "seed",
               "max_new_tokens",
               "steps", "width", "height", "improve")


@dataclass
class Line:
    lineno: int
    id: str
    spec: dict[str, Any]
    key: str = ""
    job_id: str = ""


def parse_lines(src: Path, workload: str, priority: str, model: str | None, validate: Any, improve: bool = False,
                tenant: str | None = None) -> tuple[list[Line], list[tuple[int, str | None, str]]]:
    """The valid lines, and (line number, id, reason) of each bad one."""
    from broker.errors import InvalidJob

    lines: list[Line] = []
    bad: list[tuple[int, str | None, str]] = []
    seen: dict[str, int] = {}
    with src.open(encoding="utf-8", errors="replace") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.strip())
            except json.JSONDecodeError as exc:
                bad.append((lineno, None, f"not JSON: {exc.msg} (column {exc.colno})"))
                continue
            if not isinstance(obj, dict):
                bad.append((lineno, None, f"not a JSON object but {type(obj).__name__}"))
                continue
            ident = obj.pop("id", lineno)
            if isinstance(ident, bool) or not isinstance(ident, (str, int)) or not ID_RE.fullmatch(str(ident)):
                reason = (f"id {ident!r}: must be 1 to 128 letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit (it names the output file)")
                bad.append((lineno, None, reason))
                continue
            ident = str(ident)
            if ident in seen:
                bad.append((lineno, ident, f"duplicate id {ident!r} (first on line {seen[ident]})"))
                continue
            seen[ident] = lineno
            if not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
                reason = "missing prompt" if "prompt" not in obj else "prompt must be a non-empty string"
                bad.append((lineno, ident, reason))
                continue
            spec = {"workload": workload, "priority": priority, **({"improve": True} if improve else {}),
                    **({"tenant": tenant} if tenant else {}), **obj}
            if model is not None and "model" not in obj and spec["workload"] == workload:
                spec["model"] = model
            try:
                validate(spec)
            except InvalidJob as exc:
                bad.append((lineno, ident, str(exc)))
                continue
            lines.append(Line(lineno, ident, spec))
    return lines, bad


def report_bad(console: Any, errors_file: Any, lineno: int, ident: str | None, reason: str) -> None:
    where = f"line {lineno}" + (f" (id {ident})" if ident is not None and ident != str(lineno) else "")
    console.print(f"{where}: {reason}", style="red", markup=False, soft_wrap=True)
    append(errors_file, {"line": lineno, "id": ident, "error": reason})
