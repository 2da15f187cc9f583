"""The layers, enforced: imports point down only.

    broker   the Redis contract: settings, schemas, states, keys, Lua, job store, ledger, stats, budgets'
             and histograms' records, the sim catalog, Celery app factory, transport, client
    cache    the fragment cache (tiers, loader, index, peers)
    workers  execution: Celery tasks, the run, its hooks, devices, backends
    arbiter  the control plane (pressure, budgets, policy, world, beat, status, metrics)
    apps     arbiter's programs: the CLI (the composition root), gateway, batch, bench, demo, stack, Flower's app

A module may import from its own layer and the ones below it, never above — not at the top of the file,
not lazily inside a function, not by a dotted string ("workers.celery_app", "pkg.mod:attr") handed to
something that imports it. Logger names and Celery task names are not imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("broker", "cache", "workers", "arbiter", "apps")
APPS = ("arbiter.cli", "arbiter.__main__", "arbiter.gateway", "arbiter.batch", "arbiter.bench", "arbiter.demo",
        "arbiter.stack", "arbiter.flower_app")
DOTTED = re.compile(r"^(broker|cache|workers|arbiter)(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?$")


def layer(module: str) -> int:
    if module.startswith(APPS) and any(module == a or module.startswith(a + ".") for a in APPS):
        return LAYERS.index("apps")
    return LAYERS.index(module.split(".")[0])


def is_module(dotted: str) -> bool:
    """A dotted string names one of our modules (not, say, a Celery task name like "arbiter.llm.generate")."""
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) for every import and every dotted module string, except logger names."""
    logger_args = {id(call.args[0]) for call in ast.walk(tree) if isinstance(call, ast.Call) and call.args
                   and getattr(call.func, "attr", getattr(call.func, "id", "")) == "getLogger"}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in logger_args \
                and DOTTED.match(node.value) and is_module(node.value.split(":")[0]):
            out.append((node.lineno, node.value.split(":")[0]))
    return [(line, m) for line, m in out if m.split(".")[0] in ("broker", "cache", "workers", "arbiter")]


def sources() -> list[Path]:
    return sorted(p for top in ("broker", "cache", "workers", "arbiter") for p in (ROOT / top).rglob("*.py"))


def test_imports_point_down_only() -> None:
    upward = []
    for path in sources():
        me = module_name(path)
        for line, target in imported(ast.parse(path.read_text(), str(path))):
            if layer(target) > layer(me):
                upward.append(f"{path.relative_to(ROOT)}:{line}: {LAYERS[layer(me)]} module {me} imports "
                              f"{target} ({LAYERS[layer(target)]})")
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_the_check_sees_lazy_and_string_imports() -> None:
    """The detector itself: a lazy import inside a function and a dotted string are both found."""
    tree = ast.parse("def f():\n    from workers import simprofile\n"
                     "APP = 'workers.celery_app'\nlog = logging.getLogger('arbiter.job')\n")
    assert sorted(imported(tree)) == [(2, "workers"), (3, "workers.celery_app")]
    assert layer("arbiter.cli") > layer("arbiter.beat") > layer("workers.runner") > layer("cache.tiers") \
        > layer("broker.keys")


def modules_imported(tree: ast.AST) -> set[str]:
    """Every module of ours a file imports, anywhere in it (lazily, under TYPE_CHECKING too): `from pkg import
    mod` counts as `pkg.mod` when `mod` is a module, else as `pkg`."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names if is_module(f"{node.module}.{a.name}")}
            out |= subs if len(subs) == len(node.names) else subs | {node.module}
    return {m for m in out if m.split(".")[0] in ("broker", "cache", "workers", "arbiter") and is_module(m)}


def test_no_two_modules_import_each_other() -> None:
    """Of two modules, one may depend on the other, never both (batch run/ui, bench cache/cache_model, gateway
    app/openai_routes and broker redis_server/redis_url did): a lazy import only hides such a circle."""
    graph = {module_name(p): modules_imported(ast.parse(p.read_text(), str(p))) for p in sources()}
    circles = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                      if b != a and a in graph.get(b, set())})
    assert not circles, "modules that import each other:\n" + "\n".join(f"{a} <-> {b}" for a, b in circles)
