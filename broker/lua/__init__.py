"""Lua scripts, one per operation, each opening with a comment naming its KEYS and ARGV. A line
`-- #include <name>` is replaced by `<name>.lua` of the same package at load (shared functions:
`job_lib.lua`)."""

from __future__ import annotations

import re
from importlib.resources import files

_INCLUDE = re.compile(r"^-- #include (\w+)$", re.MULTILINE)


def load(name: str, package: str = __package__) -> str:
    """The text of `<package>/<name>.lua`, its includes put in place."""
    text = files(package).joinpath(f"{name}.lua").read_text()
    return _INCLUDE.sub(lambda m: load(m.group(1), package), text)
