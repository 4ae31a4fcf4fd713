"""The shape of search/: the run directory is a record that depends on nothing above it, the
modules import each other without a cycle (lazy imports inside functions included), and no
module reaches into Optuna's private API (an Optuna upgrade must not silently break resume)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEARCH = ROOT / "search"
MODULES = sorted(p.stem for p in SEARCH.glob("*.py") if p.stem != "__init__")
PURE_DATA = {"records"}  # modules rundir may use: no imports from search/ or mergelab themselves


def _search_imports(path: Path) -> set[str]:
    """The search/ modules a file imports, anywhere in it (module level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module and (node.module == "search" or node.module.startswith("search.")):
                rest = node.module.split(".")[1:]
                out |= {rest[0]} if rest else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("search.")}
    return out & set(MODULES)


def _graph() -> dict[str, set[str]]:
    return {m: _search_imports(SEARCH / f"{m}.py") for m in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph as a path [a, b, ..., a], else None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    graph = {m: {n for n in ns if n in graph} for m, ns in graph.items()}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n] if n in path else [m, n, m]
            if n not in state:
                found = visit(n, path + [n])
                if found:
                    return found
        state[m] = 2
        return None

    for m in graph:
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_search_modules_import_each_other_without_a_cycle():
    graph = _graph()
    assert graph["loop"] >= {"validate", "storage", "objective", "recovery", "rundir"}  # the walk sees imports
    assert _cycle(graph) is None, f"import cycle in search/: {' -> '.join(_cycle(graph))}"


def test_the_run_directory_depends_on_nothing_above_it():
    assert _search_imports(SEARCH / "rundir.py") <= PURE_DATA
    for m in PURE_DATA:
        assert _search_imports(SEARCH / f"{m}.py") == set()
        tree = ast.parse((SEARCH / f"{m}.py").read_text(encoding="utf-8"))
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {x for x in mods if x and x.split(".")[0] in ("mergelab", "optuna", "torch")}
    # held-out scoring and exports are above the loop's pieces, never the loop itself
    assert "loop" not in _search_imports(SEARCH / "heldout.py")
    assert not _search_imports(SEARCH / "export.py") & {"loop"}


@pytest.mark.parametrize("module", MODULES)
def test_each_search_module_imports_on_its_own(module):
    importlib.import_module(f"search.{module}")


def test_no_private_optuna_or_search_api_is_used():
    """No `obj._name` on anything but self/cls in search/ and the TUI's run reader (Optuna's
    study._storage, trial._trial_id, storage._get_stale_trial_ids were such), no import from a
    private optuna module, and nothing outside search/ imports a private name of search/."""
    allowed = {"_replace"}  # namedtuple's public API (urllib's SplitResult)
    found = []
    readers = {*SEARCH.glob("*.py"), ROOT / "mergelab" / "tui" / "state.py"}
    for path in [*SEARCH.glob("*.py"), *(ROOT / "mergelab").rglob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module:
                if n.module.startswith("optuna") and any(p.startswith("_") for p in n.module.split(".")):
                    found.append(f"{path.name}:{n.lineno} from {n.module}")
                if n.module.startswith("search") and path.parent != SEARCH:
                    found += [f"{path.name}:{n.lineno} {a.name}" for a in n.names
                              if a.name.startswith("_")]
            if path in readers and isinstance(n, ast.Attribute) and n.attr.startswith("_") \
                    and not n.attr.startswith("__") and n.attr not in allowed \
                    and ast.unparse(n.value) not in ("self", "cls"):
                found.append(f"{path.name}:{n.lineno} {ast.unparse(n)}")
    assert found == []
