"""The package map holds: imports only go down the pipeline, no cycles, no private names
imported across modules, function-level imports only for optional third-party packages, and
no function longer than 60 lines (rule tables aside). Parsed with ``ast``: nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PKG = Path(__file__).resolve().parents[1] / "etp_fx"

# the pipeline, bottom to top: a module may import its own stage and the stages below it
STAGES = ["errors", "version", "capture", "graph", "regularise", "surgery", "face", "package"]
FACE = {"io", "render", "cli", "demo", "models", "baselines", "hf"}
# rule tables: one short entry per op, long by nature
LONG_OK = {"etp_fx/graph/rules/aten.py"}
MAX_LINES = 60


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _stage(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    head = parts[1]
    if head in FACE:
        return "face"
    assert head in STAGES, f"{module}: add it to a stage of the package map (docs/design.md)"
    return head


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        out[_module_name(p)] = (p, ast.parse(p.read_text(), filename=str(p)))
    return out


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mods) -> list[tuple[str, str, ast.stmt, bool, list[str]]]:
    """(importer, imported etp_fx module, node, at module level, imported names)."""
    found = []
    for name, (path, tree) in mods.items():
        is_pkg = path.name == "__init__.py"
        top = {id(n) for n in tree.body}
        top |= {id(n) for t in tree.body if isinstance(t, (ast.If, ast.Try))
                for n in ast.walk(t)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(name, is_pkg, node)
                names = [a.name for a in node.names]
                if target.startswith("etp_fx"):
                    # ``from . import select``: the name may be a submodule
                    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
                    for t in subs or [target]:
                        found.append((name, t, node, id(node) in top, names))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("etp_fx"):
                        found.append((name, a.name, node, id(node) in top, []))
    return found


def test_imports_only_go_down_the_pipeline():
    mods = _modules()
    bad = []
    for src, dst, node, _, _ in _imports(mods):
        if dst not in mods:
            continue
        if STAGES.index(_stage(dst)) > STAGES.index(_stage(src)):
            bad.append(f"{src} ({_stage(src)}) imports {dst} ({_stage(dst)}) at line {node.lineno}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    mods = _modules()
    g = nx.DiGraph()
    for src, dst, _, _, _ in _imports(mods):
        # a package's __init__ re-exports its modules: that edge is not a dependency of theirs
        if dst in mods and src != dst and not dst.startswith(src + "."):
            g.add_edge(src, dst)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_no_private_names_across_modules():
    mods = _modules()
    bad = [f"{src} imports {n} from {dst} (line {node.lineno})"
           for src, dst, node, _, names in _imports(mods) for n in names
           if n.startswith("_") and n != "__version__" and dst != src]
    assert not bad, "\n".join(bad)


def test_function_level_imports_are_only_for_optional_packages():
    mods = _modules()
    bad = [f"{src} imports {dst} inside a function (line {node.lineno})"
           for src, dst, node, at_top, _ in _imports(mods) if not at_top]
    assert not bad, "\n".join(bad)


def _long_functions() -> list[str]:
    out = []
    for p in sorted(PKG.rglob("*.py")):
        rel = str(p.relative_to(PKG.parent))
        if rel in LONG_OK:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    out.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_over_60_lines():
    assert not _long_functions(), "\n".join(_long_functions())


@pytest.mark.parametrize("stage", ["capture", "graph", "regularise", "surgery"])
def test_every_stage_is_a_subpackage(stage):
    assert (PKG / stage / "__init__.py").exists()
