"""`ruff check .` with the rule set chosen in pyproject.toml ([tool.ruff.lint]) finds nothing: a new finding
fails the tests (fix it, or put `# noqa: CODE - why` on the line)."""

import shutil
import subprocess

import pytest

from tests.conftest import ROOT


def ruff() -> list[str]:
    """The binary of the installed ruff wheel, else one on PATH."""
    try:
        from ruff.__main__ import find_ruff_bin
    except ImportError:
        found = shutil.which("ruff")
        if found is None:
            pytest.skip("ruff is in the test extra (`pip install -e '.[test]'`); CI has it")
        return [found]
    return [find_ruff_bin()]


def test_ruff_finds_nothing():
    p = subprocess.run([*ruff(), "check", "--no-cache", "--output-format", "concise", "."], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]


def test_the_rule_set_is_chosen_in_pyproject():
    import tomllib

    lint = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert {"F", "E", "W", "B", "I", "UP"} <= set(lint["select"]), lint["select"]
