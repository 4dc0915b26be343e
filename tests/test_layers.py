"""The import graph of mailer/ is layered one way (docs/design.md#how-the-code-is-arranged).

Every import is read with ``ast``: at the top of a module, inside functions and under
``TYPE_CHECKING``, because each of those is a dependency a reader has to follow. A
module imports only its own layer or lower, nothing imports in a circle, and no module
grows past 400 lines (migrations excepted: they are written once and never read
together with the code).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 400

# The layer table. A module belongs to the layer of the longest name here that is the
# module itself or one of its packages ("mailer.web" covers mailer/web/admin/blasts.py).
# A new module must be given a layer here before its first import is allowed.
LAYERS: dict[int, tuple[str, ...]] = {
    0: (
        "config",
        "keys",
        "errors",
        "db",
        "tokens",
        "backoff",
        "logs",
        "migrate",
        "devsmtp",
        "csvsafe",
        "config_values",
        "wire",
        "driver_sql",
    ),
    1: ("models", "runtime", "stats", "heartbeat", "queue", "dkim"),
    2: (
        "smtp",
        "smtp_pipeline",
        "smtp_replies",
        "throttle",
        "statements",
        "render",
        "subscriptions",
        "signup_statements",
        "editors",
        "admin_sessions",
        "privacy",
        "cms_html",
        "feed_fetch",
        "feed_status",
        "dev_login",
    ),
    3: (
        "blast_state",
        "record",
        "record_sql",
        "confirmations",
        "importer",
        "exporter",
        "bounces",
        "signup_guard",
    ),
    4: ("blasts", "delivery", "reconcile", "feed_actions", "feeds"),
    5: ("ops",),
    6: ("web", "cli", "worker"),
}
# The only modules that may import arq: the enqueue side and the task side.
ARQ_MODULES = {"mailer.queue", "mailer.worker"}
# The worker is the composition root: only the command line starts it.
WORKER_IMPORTERS = ("mailer.cli",)
# Modules that join routers; every other module that defines a router is one.
ROUTER_ASSEMBLERS = {"mailer.web.app", "mailer.web.admin"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # what it imports: a mailer module, or a top-level package name
    line: int


def modules(root: Path) -> dict[str, Path]:
    """Every module of the ``mailer`` package under ``root``, by dotted name."""
    out = {}
    for path in sorted((root / "mailer").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if "migrations" in parts:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str:
    """The mailer module ``name`` lives in (a name imported from a module is that module)."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports(root: Path) -> Iterator[Import]:
    known = modules(root)
    for module, path in known.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(module, _target(alias.name, known), node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    name = full if full in known else base
                    yield Import(module, _target(name, known), node.lineno)


def _target(name: str, known: dict[str, Path]) -> str:
    if name == "mailer" or name.startswith("mailer."):
        return _resolve(name, known)
    return name.split(".")[0]


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (length of the matching name, layer)
    for layer, names in LAYERS.items():
        for name in names:
            full = f"mailer.{name}"
            if module == full or module.startswith(full + "."):
                if best is None or len(full) > best[0]:
                    best = (len(full), layer)
    if module == "mailer":
        return 0
    return None if best is None else best[1]


def graph(root: Path) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in modules(root)}
    for imp in imports(root):
        if imp.target in edges and imp.target != imp.module:
            edges[imp.module].add(imp.target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward(root: Path) -> list[str]:
    out = []
    for imp in imports(root):
        if not imp.target.startswith("mailer"):
            continue
        have, want = layer_of(imp.module), layer_of(imp.target)
        if have is not None and want is not None and want > have:
            out.append(
                f"{imp.module}:{imp.line} (layer {have}) imports {imp.target} (layer {want})"
            )
    return out


def routers(root: Path) -> set[str]:
    """Modules that define a module-level ``router``."""
    out = set()
    for module, path in modules(root).items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "router" for t in node.targets
            ):
                out.add(module)
    return out


# The rules, on the real tree -----------------------------------------------------------


def test_every_module_has_a_layer() -> None:
    missing = [m for m in modules(ROOT) if layer_of(m) is None]
    assert missing == [], f"give these modules a layer in LAYERS: {missing}"


def test_no_import_cycle_in_mailer() -> None:
    assert cycles(graph(ROOT)) == []


def test_no_module_imports_a_higher_layer() -> None:
    assert upward(ROOT) == []


def test_no_module_over_400_lines() -> None:
    long = {
        m: n
        for m, p in modules(ROOT).items()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def test_only_the_queue_and_the_worker_import_arq() -> None:
    users = {imp.module for imp in imports(ROOT) if imp.target == "arq"}
    assert users == ARQ_MODULES


def test_nothing_imports_the_worker_but_the_command_line() -> None:
    users = {imp.module for imp in imports(ROOT) if imp.target == "mailer.worker"}
    assert users and all(u.startswith(WORKER_IMPORTERS) for u in users), users


def test_web_routers_do_not_import_each_other() -> None:
    found = routers(ROOT)
    assert {"mailer.web.api", "mailer.web.public", "mailer.web.admin.blasts"} <= found
    crossing = [
        f"{imp.module} imports {imp.target}"
        for imp in imports(ROOT)
        if imp.module in found and imp.target in found and imp.module not in ROUTER_ASSEMBLERS
    ]
    assert crossing == []


# The walk itself, on a made-up tree: each rule fails when it should ----------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_the_walk_sees_imports_in_functions_and_under_type_checking(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "mailer/__init__.py": "",
            "mailer/config.py": "def f():\n    from mailer import blasts\n",
            "mailer/keys.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from mailer.web.app import create_app\n"
            ),
            "mailer/blasts.py": "from .config import f\n",
            "mailer/web/__init__.py": "",
            "mailer/web/app.py": "import mailer.keys\n",
            "mailer/migrations/env.py": "from mailer import web\n" + "x = 1\n" * 500,
        },
    )
    assert upward(root) == [
        "mailer.config:2 (layer 0) imports mailer.blasts (layer 4)",
        "mailer.keys:3 (layer 0) imports mailer.web.app (layer 6)",
    ]
    assert cycles(graph(root)) == [
        ["mailer.blasts", "mailer.config"],
        ["mailer.keys", "mailer.web.app"],
    ]
    assert "mailer.migrations.env" not in modules(root)


def test_the_readme_module_table_names_every_module_of_the_layers() -> None:
    """README's table is how a newcomer finds their way: it lists what LAYERS lists."""
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line[:4] in
            {f"| {n} " for n in LAYERS}]  # fmt: skip
    table = "\n".join(rows)
    missing = [
        name
        for names in LAYERS.values()
        for name in names
        if f"{name}.py`" not in table and f"{name}/`" not in table
    ]
    assert missing == []
