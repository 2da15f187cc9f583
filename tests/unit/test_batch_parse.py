"""`arbiter batch`'s defaults for its lines: a line's own fields win over the options (tenant included)."""

import json
from pathlib import Path

from arbiter.batch.parse import parse_lines
from arbiter.batch.ui import resume_command
from broker.schemas import Priority, Workload


def test_the_tenant_option_is_a_default_a_line_may_override(tmp_path: Path):
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "x"}) + "\n" + json.dumps({"id": "b", "prompt": "y", "tenant": "bob"}) + "\n")
    lines, bad = parse_lines(src, "diffusion", "background", None, lambda spec: None, tenant="alice")
    assert not bad and [ln.spec.get("tenant") for ln in lines] == ["alice", "bob"]
    lines, _ = parse_lines(src, "diffusion", "background", None, lambda spec: None)
    assert [ln.spec.get("tenant") for ln in lines] == [None, "bob"]     # the job's own default applies


def test_the_resume_command_keeps_the_tenant(tmp_path: Path):
    cmd = resume_command(tmp_path / "p.jsonl", tmp_path / "out", Workload.DIFFUSION, Priority.BACKGROUND, None, "alice")
    assert cmd.endswith("--tenant alice")
    assert "--tenant" not in resume_command(tmp_path / "p.jsonl", tmp_path / "out", Workload.LLM, Priority.STANDARD, None)
