"""Help pages that read well in a pipe (`arbiter submit --help | less`, `| grep`): a terminal gets typer's rich
panels; a pipe or file gets plain text with one line per option, click's conventions for value types
(`--tenant TEXT`, `--priority [interactive|standard|background]`, a flag bare), upper-case arguments in the
usage line (in a terminal too), and no hard breaks inside a sentence (the reader's pager wraps, never rich at 80 columns).

Every command group is an `App` (a `typer.Typer` whose commands and groups use the classes below)."""

from __future__ import annotations

import re
import sys
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

PIPED_WIDTH = 100_000   # no wrapping: one line per option and per paragraph
# typer's value labels (`<str>`, `<int>`, ...) as click names them; a choice list `<a|b>` becomes `[a|b]`
TYPE_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "bool": ""}
_LABEL = re.compile(r" <([^<>]*)>$")


def piped() -> bool:
    """Whether help goes to a pipe or a file (not a terminal)."""
    return not sys.stdout.isatty()


def plain_name(name: str) -> str:
    """`--tenant <str>` -> `--tenant TEXT`; `--priority <a|b>` -> `--priority [a|b]`; `--json <bool>` -> `--json`."""
    def label(m: re.Match[str]) -> str:
        inner = m.group(1)
        if "|" in inner:
            return f" [{inner}]"
        named = TYPE_NAMES.get(inner, inner.upper())
        return f" {named}" if named else ""
    return _LABEL.sub(label, name)


def _argument_record(param: TyperArgument, ctx: Any) -> tuple[str, str]:
    """An argument listed by its upper-case name; a choice list goes into its help."""
    name, help_text = param.get_help_record(ctx) or ("", "")
    m = _LABEL.search(name)
    if m and "|" in m.group(1) and m.group(1) not in help_text:
        text, sep, extras = help_text.partition("  [")   # the choices before `[required]`, `[default: ...]`
        help_text = f"{text} ({m.group(1)})".strip() + sep + extras
    return (param.metavar or param.name or "").upper(), help_text


def _usage_pieces(cmd: typer.core.click.Command, ctx: Any) -> list[str]:
    pieces = [cmd.options_metavar] if cmd.options_metavar else []
    for param in cmd.get_params(ctx):
        if isinstance(param, TyperArgument):
            name = (param.metavar or param.name or "").upper() + ("..." if param.nargs != 1 else "")
            pieces.append(name if param.required else f"[{name}]")
    return pieces


def _write_plain(cmd: Any, ctx: Any, formatter: Any, commands: list[tuple[str, str]] | None = None) -> None:
    formatter.width = PIPED_WIDTH
    formatter.write_usage(ctx.command_path, " ".join(cmd.collect_usage_pieces(ctx)))
    cmd.format_help_text(ctx, formatter)
    arguments, options = [], []
    for param in cmd.get_params(ctx):
        if isinstance(param, TyperArgument):
            if not param.hidden:
                arguments.append(_argument_record(param, ctx))
        elif (record := param.get_help_record(ctx)) is not None:
            options.append((plain_name(record[0]), record[1]))
    for title, rows in (("Arguments", arguments), ("Options", options), ("Commands", commands or [])):
        if rows:
            with formatter.section(title):
                formatter.write_dl(rows, col_max=max(len(r[0]) for r in rows))
    cmd.format_epilog(ctx, formatter)


class Command(TyperCommand):
    def collect_usage_pieces(self, ctx: Any) -> list[str]:   # `WORKLOAD PROMPT`, not `{workload} {prompt}`
        return _usage_pieces(self, ctx)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        if not piped():
            return super().format_help(ctx, formatter)
        _write_plain(self, ctx, formatter)


class Group(TyperGroup):
    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [*_usage_pieces(self, ctx), self.subcommand_metavar]

    def format_help(self, ctx: Any, formatter: Any) -> None:
        if not piped():
            return super().format_help(ctx, formatter)
        commands = [(name, cmd.get_short_help_str(limit=PIPED_WIDTH)) for name in self.list_commands(ctx)
                    if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        _write_plain(self, ctx, formatter, commands)


class App(typer.Typer):
    """A command group whose commands (and the groups added to it) print plain help into a pipe."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cls=Group, **kwargs)

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or Command, **kwargs)
