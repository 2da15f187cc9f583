"""Lua scripts, one per operation, each opening with a comment naming its KEYS and ARGV."""

from __future__ import annotations

from importlib.resources import files


def load(name: str, package: str = __package__) -> str:
    """The text of `<package>/<name>.lua`."""
    return files(package).joinpath(f"{name}.lua").read_text()
