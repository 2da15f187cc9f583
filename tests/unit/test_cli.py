"""The CLI as a person pipes it: plain help pages, one-line refusals before anything is queued, the path it
prints for itself, a benchmark that runs without the ML extras, and a package build that warns of nothing."""

import re
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from arbiter.cli import app
from arbiter.cli.run import arbiter_command
from tests.conftest import ROOT


def help_page(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], prog_name="arbiter")   # CliRunner's stdout is not a terminal: a pipe
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", [["submit"], ["dev"], ["queue", "drain"], ["job", "reprioritize"], ["bench", "cache"],
                                     ["worker"], []])
def test_help_piped_is_plain_text_one_line_per_option(command):
    page = help_page(*command)
    assert not re.search(r"<(bool|str|int|float|path)>|[{}]|[╭│╰]", page), page
    usage = page.splitlines()[0]
    assert usage.startswith(f"Usage: arbiter {' '.join(command)}".rstrip() + " [OPTIONS]"), usage
    options = page.split("\nOptions:\n")[1].split("\n\n")[0].splitlines()
    assert all(line.startswith("  -") for line in options), options   # no continuation lines: nothing wrapped


def test_help_piped_keeps_choices_and_sentences_whole():
    page = help_page("submit")
    assert "Usage: arbiter submit [OPTIONS] WORKLOAD PROMPT" in page
    assert re.search(r"^  --priority \[interactive\|standard\|background\] +Queue priority\.  \[default: standard\]$",
                     page, re.MULTILINE), page
    assert re.search(r"^  --json +Print JSON\.$", page, re.MULTILINE)
    assert re.search(r"^  WORKLOAD +llm or diffusion \(llm\|diffusion\)  \[required\]$", page, re.MULTILINE)
    assert "re-run it at full quality when the GPU would otherwise idle and replace its result." in page
    dev = help_page("dev")
    assert "an llm and a diffusion worker on one sim GPU, the beat" in dev   # the docstring's line break is gone


def test_submit_diffusion_stream_is_refused_before_anything_is_queued():
    # no Redis answers at this URL: the refusal comes before the client connects
    result = CliRunner().invoke(app, ["submit", "diffusion", "a fox", "--stream"],
                                env={"ARBITER_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 2
    assert result.stderr == ("error: --stream: streaming is for llm jobs (tokens as they come); a diffusion job's "
                             "output is a file: use --out FILE (e.g. --out image.png)\n")


def test_dev_prints_the_arbiter_that_runs_here(tmp_path, monkeypatch):
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "arbiter").touch()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(sys, "argv", [str(venv / "arbiter"), "dev"])
    assert arbiter_command() == ".venv/bin/arbiter"
    monkeypatch.setattr(sys, "argv", [".venv/bin/arbiter", "dev"])
    assert arbiter_command() == ".venv/bin/arbiter"
    (venv / "arbiter").chmod(0o755)
    monkeypatch.setenv("PATH", f"{venv}:/usr/bin:/bin")
    assert arbiter_command() == "arbiter"     # the one on PATH: bare
    monkeypatch.setattr(sys, "argv", ["/somewhere/arbiter/__main__.py", "dev"])
    assert arbiter_command() == f"{sys.executable} -m arbiter"


def test_bench_cache_without_the_ml_extras_skips_the_model_row_with_a_note(tmp_path):
    # torch and transformers absent, as after `pip install arbiter-gpu` without the llm extra
    code = ("import sys; sys.modules['torch'] = sys.modules['transformers'] = None; sys.argv[0] = 'arbiter'; "
            "from arbiter.cli import main; main()")
    p = subprocess.run([sys.executable, "-c", code, "bench", "cache", "--size", "0.02", "--nodes", "2", "--rounds", "1",
                        "--model-gb", "0.01", "--json", str(tmp_path / "c.json")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert ("real model: skipped; the real-model row needs torch and transformers: install the llm extra "
            "(pip install -e '.[llm]', or `make test`, which does)") in p.stdout
    assert "origin fetches per fragment" in p.stdout   # the rest ran


def test_package_metadata_builds_without_deprecation_warnings(tmp_path):
    """`make demo` installs the package: setuptools warned three times that `project.license` as a table is
    deprecated. The metadata is built here from a copy of pyproject.toml, every warning an error."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "out").mkdir()
    code = ("import warnings, sys; warnings.simplefilter('error'); from setuptools import build_meta; "
            "build_meta.prepare_metadata_for_build_wheel(sys.argv[1])")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "Deprecat" not in p.stderr, p.stderr[-3000:]
    meta = next((tmp_path / "out").glob("*.dist-info")) / "METADATA"
    assert "License-Expression: Apache-2.0" in meta.read_text()
