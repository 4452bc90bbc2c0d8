"""The layering of ``beagled``, checked by walking every module's imports with ``ast``.

Every ``import`` counts, wherever it stands: at module level, inside a function (a lazy import), or
under ``if TYPE_CHECKING:``. The layers, innermost first:

- the pure core (``events``, ``jobs``, ``protocol``, ``snapshot``, ``ports``, ``errors``, ``keys``):
  the standard library only, minus what does I/O; of ``beagled``, only the core and ``config``
  (``protocol`` checks names against ``config.VOICE_RE``);
- the engine (the package ``beagled.engine`` and every ``beagled.engine.*`` room): the core, ``config``,
  trio, a few small helpers and its own rooms, never a concrete adapter; the import closure of each of
  its modules holds no database driver, HTTP or SSH client, metrics library or ``subprocess``;
- the adapters (the stores, ``dialects``, ``metrics``, ``voices``, ``leader``, ``reload.*``,
  ``training.*``): never the engine, the server or the daemon, which are built on top of them;
- a training backend (``training/backend_*``, run inside a worker process): never the protocol, the
  server or the engine.

``beagled.daemon`` is the composition root, where concrete adapters meet; it may import anything.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "beagled"

CORE = {
    "beagled.events",
    "beagled.jobs",
    "beagled.protocol",
    "beagled.snapshot",
    "beagled.ports",
    "beagled.errors",
    "beagled.keys",
    "beagled.training_spec",
}
CORE_MAY_IMPORT = CORE | {"beagled", "beagled.config"}
# standard-library modules that do I/O or run things: not for the pure core
IO_STDLIB = {
    "asyncio",
    "http",
    "multiprocessing",
    "os",
    "select",
    "selectors",
    "shutil",
    "signal",
    "socket",
    "sqlite3",
    "ssl",
    "subprocess",
    "threading",
    "urllib",
}
ENGINE_HELPERS = {  # small helpers the engine may use: none of them imports an adapter
    "beagled",
    "beagled.config",
    "beagled.availability",
    "beagled.faults",
    "beagled.hfcache",
    "beagled.retention",
    "beagled.running",
}
ENGINE_THIRD_PARTY = {"trio"}
# what the engine's whole import closure must not hold
ENGINE_NEVER = {
    "asyncssh",
    "httpx",
    "prometheus_client",
    "psycopg",
    "ray",
    "sqlalchemy",
    "subprocess",
}
ADAPTERS = {
    "beagled.dialects",
    "beagled.leader",
    "beagled.metrics",
    "beagled.store",
    "beagled.adapter_dirs",
    "beagled.reload",
    "beagled.training",
}
ABOVE_ADAPTERS = {
    "beagled.engine",
    "beagled.server",
    "beagled.connection",
    "beagled.answers",
    "beagled.watches",
    "beagled.quotas",
    "beagled.daemon",
}
BACKEND_NEVER = {"beagled.protocol", "beagled.server", "beagled.engine", "beagled.daemon"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """Every module ``name`` imports (``from a import b`` yields ``a.b`` too: ``b`` may be a module),
    with the line, at any depth of the tree."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:
                yield f"{target}.{alias.name}", node.lineno


def within(target: str, group: set[str]) -> bool:
    return any(target == g or target.startswith(g + ".") for g in group)


def top(target: str) -> str:
    return target.split(".", 1)[0]


def known(target: str, mods: dict[str, Path]) -> str | None:
    """The ``beagled`` module ``target`` names (``beagled.jobs.JobState`` → ``beagled.jobs``)."""
    while target:
        if target in mods:
            return target
        target = target.rpartition(".")[0]
    return None


def arrows() -> list[tuple[str, str, int, Path]]:
    mods = modules()
    out: dict[tuple[str, str, int], Path] = {}
    for name, path in mods.items():
        for target, line in imports(name, path):
            if top(target) == "beagled":
                mod = known(target, mods)
                if mod is None:
                    continue  # ``from beagled import x`` of a name, not a module: counted as beagled
                out[name, mod, line] = path
            else:
                out[name, top(target), line] = path
    return [(src, dst, line, path) for (src, dst, line), path in out.items()]


def is_engine(name: str) -> bool:
    return name == "beagled.engine" or name.startswith("beagled.engine.")


def violations() -> list[str]:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = []
    for src, dst, line, path in arrows():
        where = f"{path.relative_to(PACKAGE.parent)}:{line}: {src} -> {dst}"
        internal = dst == "beagled" or dst.startswith("beagled.")
        if src in CORE:
            if internal and dst not in CORE_MAY_IMPORT:
                bad.append(f"{where} (the pure core imports a module outside it)")
            elif not internal and (dst not in stdlib or dst in IO_STDLIB):
                bad.append(f"{where} (the pure core imports I/O)")
        if is_engine(src):
            if internal and not (is_engine(dst) or dst in CORE or dst in ENGINE_HELPERS):
                bad.append(f"{where} (the engine imports a concrete adapter; take it as a port)")
            elif not internal and dst not in stdlib and dst not in ENGINE_THIRD_PARTY:
                bad.append(f"{where} (the engine imports a third-party library)")
        if within(src, ADAPTERS) and internal and within(dst, ABOVE_ADAPTERS):
            bad.append(f"{where} (an adapter imports what is built on it)")
        if src.startswith("beagled.training.backend_") and internal and within(dst, BACKEND_NEVER):
            bad.append(f"{where} (a training backend imports the daemon's side)")
    return bad


def closure(start: str) -> dict[str, str]:
    """Every module reachable from ``start`` by imports (``beagled`` modules followed), with the one
    that first imported it."""
    by_src: dict[str, list[str]] = {}
    for src, dst, _, _ in arrows():
        by_src.setdefault(src, []).append(dst)
    seen = {start: ""}
    todo = [start]
    while todo:
        src = todo.pop()
        for dst in by_src.get(src, []):
            if dst not in seen:
                seen[dst] = src
                if dst.startswith("beagled"):
                    todo.append(dst)
    return seen


def test_every_import_keeps_the_layering() -> None:
    bad = violations()
    assert not bad, "imports that break the layering:\n" + "\n".join(bad)


def test_the_engine_closure_holds_no_driver() -> None:
    engines = [n for n in modules() if is_engine(n)]
    assert "beagled.engine" in engines and len(engines) > 1  # the engine is a package of rooms
    bad = []
    for engine in engines:  # every room on its own: none may pull a driver in
        reach = closure(engine)
        for mod in sorted(set(reach) & ENGINE_NEVER):
            chain = [mod]
            while reach[chain[-1]]:
                chain.append(reach[chain[-1]])
            bad.append(" <- ".join(chain))
    assert not bad, "the engine's import closure holds:\n" + "\n".join(bad)


def test_every_engine_module_says_what_it_owns() -> None:
    """Each room of the engine opens with a docstring naming its concern."""
    missing = [
        str(path.relative_to(PACKAGE.parent))
        for name, path in modules().items()
        if is_engine(name) and not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert not missing, "engine modules without a docstring: " + ", ".join(missing)


def test_the_walker_sees_function_level_imports(tmp_path: Path) -> None:
    """The walk finds an import inside a function body and under ``TYPE_CHECKING`` (lazy imports
    are the usual way round a layering rule)."""
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from beagled.store import Store\n"
        "def f():\n    import subprocess\n    from . import sibling\n"
    )
    found = {t for t, _ in imports("beagled.m", src)}
    assert {"beagled.store", "subprocess", "beagled.sibling"} <= found
