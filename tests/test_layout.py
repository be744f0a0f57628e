"""The code's shape, checked: the layers import only downwards, no module imports itself back through
others, no package imports itself back through another package, no module grows past about 400 lines, a
package's docstring names each of its sub-packages, and the README's code map names every module there is
(and none that is not)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "runtime", "producer", "worker")
MAX_LINES = 400
# what each top-level package may import from the others (its layer and those below it)
MAY_IMPORT = {
    "schemas": set(),
    "runtime": {"schemas"},
    "producer": {"schemas", "runtime"},
    "worker": {"schemas", "runtime"},
}


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            found[".".join(parts)] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules a module imports, anywhere in it (a function-level import is still a
    dependency), resolved to the longest known module name."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets.update(f"{base}.{alias.name}" for alias in node.names)
            targets.add(base)
    resolved = set()
    for target in targets:
        parts = target.split(".")
        for k in range(len(parts), 0, -1):
            candidate = ".".join(parts[:k])
            if candidate in known:
                if candidate != name:
                    resolved.add(candidate)
                break
    return resolved


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, name, set(mods)) for name, path in mods.items()}


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = [f"{m} imports {d}" for m, deps in graph().items() for d in deps
             if d.split(".")[0] != m.split(".")[0] and d.split(".")[0] not in MAY_IMPORT[m.split(".")[0]]]
    assert not wrong, "imports across layers the wrong way:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    g = graph()
    # a package's __init__ importing its own modules is not a cycle of concern: only modules count
    g = {m: {d for d in deps if not (m.startswith(d + ".") and g.get(d) is not None)} for m, deps in g.items()}
    cycles = find_cycles(g)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_is_over_about_400_lines() -> None:
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


def package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def find_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycle_between_packages() -> None:
    """Sub-packages (worker/broker, worker/model, ...) depend one way: a package that imports another is
    never imported back by it, through any module (a function-level import counts)."""
    mods = modules()
    pkg_graph: dict[str, set[str]] = {}
    for module, deps in graph().items():
        here = package_of(module, mods[module])
        for dep in deps:
            there = package_of(dep, mods[dep])
            if here != there and not here.startswith(there + ".") and not there.startswith(here + "."):
                pkg_graph.setdefault(here, set()).add(there)
    cycles = find_cycles(pkg_graph)
    assert not cycles, "import cycles between packages:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", sorted(
    ".".join(p.parent.relative_to(ROOT).parts) for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py")
    if any(q.is_dir() and (q / "__init__.py").exists() for q in p.parent.iterdir())))
def test_a_package_with_sub_packages_names_each_in_its_docstring(package: str) -> None:
    """A newcomer opening `worker/__init__.py` gets the map of its sub-packages, each named and said."""
    init = ROOT / package.replace(".", "/") / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    subs = sorted(q.name for q in init.parent.iterdir() if q.is_dir() and (q / "__init__.py").exists())
    unnamed = [sub for sub in subs if f"`{sub}`" not in doc]
    assert not unnamed, f"{init}: its docstring must name (in backticks) and say what each sub-package holds: {unnamed}"


def test_the_readmes_code_map_names_every_module() -> None:
    """Every module is named in the README's code map by its path (`worker/model/session.py` or, inside
    a package's list, its file name), and every path the map names exists."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("Code map")
    code_map = readme[start: readme.index("\n## ", start)]
    named = set(re.findall(r"`((?:schemas|runtime|producer|worker)/[\w/]*\.py)`", code_map))
    missing_files = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing_files, f"the code map names files that do not exist: {missing_files}"
    unnamed = sorted(str(p.relative_to(ROOT)) for p in modules().values()
                     if p.name not in {"__init__.py", "__main__.py"} and str(p.relative_to(ROOT)) not in named)
    assert not unnamed, f"modules missing from the README's code map: {unnamed}"


def test_the_runner_stays_short_and_nothing_outside_the_model_asks_which_model_it_has() -> None:
    """Issue 28's acceptance: the runner at most 200 lines; no `isinstance` on a concrete model class (the host
    decides where the model runs: worker/model/host.py) outside worker/model/."""
    runner = ROOT / "worker" / "service" / "runner.py"
    assert len(runner.read_text().splitlines()) <= 200
    concrete = {"Sam2Segmenter", "Sam2Session", "ModelProcess", "ProcessSession", "InProcessModel", "ModelHost"}
    found = []
    for path in sorted(ROOT.glob("[!.]*/**/*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] not in ("producer", "worker", "runtime", "schemas") or rel.parts[:2] == ("worker", "model"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance" and len(node.args) == 2:
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                found += [f"{rel}:{node.lineno} {name}" for name in names & concrete]
    assert not found, found
