"""The stages import one way, like the data flows, and no module imports itself back.

Read from the source (``ast``), not by importing: every ``import`` counts, the ones inside
functions too, since a lazy import that closes a loop is still a loop. The stage folders are
found through pyproject's package-dir (``train/`` is ``unsuperpose.train``, ...), and the folders
show the layers: ``unsuperpose/`` is the core alone, each stage and the command layer
(``commands/``) a top-level folder of its own.

    unsuperpose (the core) <- lm, harvest, toy <- train <- analyze <- commands
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The command layer: everything that wires the stages together and parses flags. The core's
# cli.py and __main__.py are its entry points (``unsuperpose.cli:main``, ``python -m``) only.
COMMANDS = ("unsuperpose.commands", "unsuperpose.cli", "unsuperpose.__main__")
ENTRY_POINTS = ("unsuperpose.cli", "unsuperpose.__main__")
# Which stages each stage may import, besides itself. harvest runs the LM; toy and train need
# nothing of the others (train sees only the activation-source interface, whatever made it).
MAY_IMPORT = {
    "core": set(),
    "lm": {"core"},
    "harvest": {"core", "lm"},
    "toy": {"core"},
    "train": {"core"},
    "analyze": {"core", "lm", "harvest", "toy", "train"},
    "commands": {"core", "lm", "harvest", "toy", "train", "analyze"},
}


def _modules() -> dict[str, Path]:
    """Every module of the package -> its file, the stage folders mapped as pyproject says."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    out = {}
    for package, folder in setup["package-dir"].items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join([package, *(p for p in parts if p != "__init__")])
            # unsuperpose/ holds only the core's files; its stages come from their own folders
            out.setdefault(name, path)
    return out


MODULES = _modules()


def _target(name: str, imported: str | None = None) -> str | None:
    """The module of ours an import names: ``from pkg import sub`` is ``pkg.sub`` when that is
    a module (a parent package is not counted as imported: Python runs it first either way)."""
    if imported and f"{name}.{imported}" in MODULES:
        return f"{name}.{imported}"
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {_target(a.name) for a in node.names if a.name.startswith("unsuperpose")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            if base.startswith("unsuperpose"):
                found |= {_target(base, a.name) for a in node.names}
    return found - {None, module}


GRAPH = {m: _imports(m) for m in MODULES}


def stage(module: str) -> str:
    if module.startswith(COMMANDS):
        return "commands"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else "core"


def test_every_stage_imports_only_the_stages_below_it():
    wrong = sorted(
        f"{m} ({stage(m)}) imports {t} ({stage(t)})"
        for m, targets in GRAPH.items()
        for t in targets
        if stage(t) != stage(m) and stage(t) not in MAY_IMPORT[stage(m)]
    )
    assert not wrong, "\n".join(wrong)


def test_each_layer_has_a_folder_of_its_own():
    """unsuperpose/ holds the core's modules and no package; the stages and the command layer are
    each a top-level folder, installed under unsuperpose."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {p: f for p, f in setup["package-dir"].items() if p != "unsuperpose"}
    assert folders == {f"unsuperpose.{s}": s for s in MAY_IMPORT if s != "core"}
    assert not [p for p in (ROOT / "unsuperpose").iterdir() if (p / "__init__.py").exists()]
    assert all(MODULES[m].parent == ROOT / "commands" for m in MODULES if m.startswith(COMMANDS[0]))


def test_the_core_opens_onto_the_commands_only_through_its_entry_points():
    """The core's cli.py and __main__.py hand over to ``unsuperpose.commands.cli`` and hold
    nothing else of the command layer's."""
    for module in ENTRY_POINTS:
        assert GRAPH[module] <= {"unsuperpose.commands.cli", "unsuperpose.cli"}, module
    core = [m for m in MODULES if stage(m) == "core"]
    assert not [m for m in core if any(stage(t) == "commands" for t in GRAPH[m])]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_back():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_registry_is_a_leaf_and_every_family_registers_itself():
    """The registry imports nothing of ours, so no family import can cycle through it; no
    family module is imported by name outside its package (the package imports them all)."""
    assert GRAPH["unsuperpose.train.registry"] == set()
    families = "unsuperpose.train.families."
    named = sorted(
        f"{m} imports {t}"
        for m, targets in GRAPH.items()
        if not m.startswith(families)
        for t in targets
        if t.startswith(families) and not t.endswith((".stacked", ".sparse_step", ".auxk"))
    )
    assert not named, "\n".join(named)


@pytest.mark.parametrize("folder", ["train", "lm"])
def test_no_import_waits_for_the_end_of_a_file(folder):
    """An import after code (``noqa: E402``) is how a cycle hides: none in these stages."""
    late = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / folder).rglob("*.py"))
        if "noqa: E402" in p.read_text()
    ]
    assert not late, late
