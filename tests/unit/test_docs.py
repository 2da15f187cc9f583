"""The README stays a first-ten-minutes page whose links work; the docs site builds with no broken link,
missing anchor or page left out of its nav (`mkdocs build --strict`, with the checks mkdocs.yml turns on)."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = README.splitlines()
    assert len(lines) <= 250, len(lines)
    top = "\n".join(lines[:15])
    assert "make demo    # embedded Redis" in top and "make test    # the whole test suite" in top


def test_readme_links_point_at_files_that_exist():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "the README links to the docs"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, missing


def test_docs_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is in the test extra (`pip install -e '.[test]'`); CI has it")
    pytest.importorskip("material", reason="mkdocs-material is in the test extra; CI has it")
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert p.returncode == 0, p.stderr[-4000:]
    for page in ("architecture", "cli", "python-client", "gateway", "openai", "celery", "operations", "scaling",
                 "benchmarks"):
        assert (tmp_path / "site" / page / "index.html").exists(), page
