"""The tree shows the architecture: folders are layers, each depending only downward.

Read with ``ast`` (no imports run): the import graph of the package, the scripts, the experiments' drivers and
the benchmarks has no cycle (module-level and function-level imports alike), nor has the graph of the package's
folders (its entry points aside); ``moelora_lit/eval/`` imports nothing
from ``moelora_lit.lightning`` or ``moelora_lit.data``; every third-party import is declared in pyproject.toml; and
every repository path the documentation names exists.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
GRAPH_DIRS = ("moelora_lit", "scripts", "experiments", "benchmarks")
IMPORT_DIRS = ("moelora_lit", "scripts", "benchmarks", "experiments", "examples", "tests")
DOCS = ("README.md", "docs/*.md", "experiments/README.md")
PACKAGE = "moelora_lit"


def python_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    """``moelora_lit.eval.loglik`` for a package file; the repository-relative path for a script."""
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else Path(path.name)
    if rel.parts[0] != PACKAGE:
        return rel.as_posix()
    parts = rel.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> Iterator[tuple[str, int]]:
    """Absolute dotted names that ``path`` imports anywhere in the file (``from a import b`` gives ``a.b``), with
    the line; relative imports resolved against the file's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[:len(package) - node.level + 1], *([base] if base else [])])
            for alias in node.names:  # a.b: the module a.b if there is one, else a (resolve takes the longest)
                yield base if alias.name == "*" else f"{base}.{alias.name}", node.lineno


@cache
def local_modules(folder: Path) -> dict[str, Path]:
    """Top-level names a script in ``folder`` imports from beside it (its folder is on ``sys.path``)."""
    out = {p.stem: p for p in folder.glob("*.py")}
    out |= {p.name: p / "__init__.py" for p in folder.iterdir() if (p / "__init__.py").is_file()}
    return out


@cache
def script_modules() -> dict[str, list[Path]]:
    """Stem -> files of every script folder: a script may put another script folder on ``sys.path``."""
    out: dict[str, list[Path]] = {}
    for path in python_files(*IMPORT_DIRS[1:]):
        out.setdefault(path.stem, []).append(path)
    return out


def resolve(name: str, importer: Path) -> list[Path]:
    """The project files an imported dotted name refers to (empty for the standard library and third party)."""
    top = name.split(".")[0]
    if top == PACKAGE:
        parts = name.split(".")
        for n in range(len(parts), 0, -1):  # the longest prefix that is a module or package
            base = ROOT.joinpath(*parts[:n])
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return [candidate]
        return []
    if importer.relative_to(ROOT).parts[0] == PACKAGE or top in sys.stdlib_module_names:
        return []
    beside = local_modules(importer.parent)
    if top in beside:
        return [beside[top]] if beside[top] != importer else []
    return [p for p in script_modules().get(top, []) if p != importer]


def import_graph() -> dict[Path, dict[Path, int]]:
    """File -> {imported project file: first line}."""
    graph: dict[Path, dict[Path, int]] = {}
    for path in python_files(*GRAPH_DIRS):
        edges = graph.setdefault(path, {})
        for name, line in imported_names(path):
            for target in resolve(name, path):
                if target != path and target.relative_to(ROOT).parts[0] in GRAPH_DIRS:
                    edges.setdefault(target, line)
    return graph


def find_cycles(graph: dict[Path, dict[Path, int]]) -> list[list[Path]]:
    """Strongly connected components with more than one file (Tarjan)."""
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    on_stack: set[Path] = set()
    out: list[list[Path]] = []

    def visit(node: Path) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def describe(component: list[Path], graph: dict[Path, dict[Path, int]]) -> str:
    members = set(component)
    return "; ".join(f"{a.relative_to(ROOT)}:{line} -> {b.relative_to(ROOT)}"
                     for a in component for b, line in graph[a].items() if b in members)


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 50 and any(graph.values())
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe(c, graph) for c in cycles)


# The package's entry points may name any layer: the public names (lazily), the CLI, the answers shim.
FACADES = ("moelora_lit/__init__.py", "moelora_lit/__main__.py", "moelora_lit/answers.py")


def layer(path: Path) -> str:
    """``moelora_lit/<folder>`` for a subpackage file, ``moelora_lit`` for the method at the package root."""
    parts = path.relative_to(ROOT).parts
    return "/".join(parts[:2]) if len(parts) > 2 else parts[0]


def test_the_package_folders_are_layers() -> None:
    """Folders depend on each other in one direction only (the method at the root, then eval, data, ...)."""
    folders: dict[Path, dict[Path, int]] = {}
    for path, edges in import_graph().items():
        if path.relative_to(ROOT).parts[0] != PACKAGE or path.relative_to(ROOT).as_posix() in FACADES:
            continue
        for target, line in edges.items():
            if layer(target) != layer(path) and target.relative_to(ROOT).parts[0] == PACKAGE:
                folders.setdefault(ROOT / layer(path), {}).setdefault(ROOT / layer(target), line)
    assert (ROOT / "moelora_lit/data") in folders and (ROOT / "moelora_lit/eval") in folders[ROOT / "moelora_lit/data"]
    cycles = find_cycles(folders)
    assert not cycles, "folders that import each other: " + "; ".join(
        " <-> ".join(str(p.relative_to(ROOT)) for p in c) for c in cycles)


def test_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    a, b, c = (ROOT / "x" / f"{n}.py" for n in "abc")
    assert find_cycles({a: {b: 1}, b: {c: 3}, c: {}}) == []
    assert find_cycles({a: {b: 1}, b: {a: 3}, c: {a: 1}}) == [[a, b]]
    (tmp_path / "m.py").write_text("import os\n\n\ndef f():\n    from moelora_lit.eval import loglik\n")
    assert set(imported_names(tmp_path / "m.py")) == {("os", 1), ("moelora_lit.eval.loglik", 5)}
    assert resolve("moelora_lit.eval.loglik", ROOT / "scripts" / "x.py") == [ROOT / "moelora_lit/eval/loglik.py"]
    assert resolve("moelora_lit.eval.loglik.picks", ROOT / "x.py") == [ROOT / "moelora_lit/eval/loglik.py"]


def test_eval_imports_neither_lightning_nor_data() -> None:
    bad = [f"{p.relative_to(ROOT)}:{line}: {name}" for p in python_files(f"{PACKAGE}/eval")
           for name, line in imported_names(p)
           if name.split(".")[:2] in ([PACKAGE, "lightning"], [PACKAGE, "data"])]
    assert not bad, "moelora_lit/eval/ must not import the Lightning layer or the data layer:\n" + "\n".join(bad)


def normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project.get("dependencies", []),
                    *(r for extra in project.get("optional-dependencies", {}).values() for r in extra)]
    return {normalize(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r).group()) for r in requirements}


def third_party_imports() -> dict[str, list[str]]:
    """Top-level third-party import name -> where it is imported."""
    out: dict[str, list[str]] = {}
    for path in python_files(*IMPORT_DIRS):
        for name, line in imported_names(path):
            top = name.split(".")[0]
            if not top or top == "__future__" or top in sys.stdlib_module_names or resolve(top, path):
                continue
            if top == PACKAGE or top in local_modules(path.parent) or top in script_modules():
                continue
            out.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{line}")
    return out


def test_every_third_party_import_is_declared() -> None:
    declared, dists = declared_distributions(), importlib.metadata.packages_distributions()
    imports = third_party_imports()
    assert {"torch", "lightning", "transformers"} <= set(imports)
    missing = {top: where[:3] for top, where in sorted(imports.items())
               if not ({normalize(d) for d in dists.get(top, [])} | {normalize(top)}) & declared}
    assert not missing, ("imported but not declared in pyproject.toml (dependencies or an extra); import name -> "
                         f"distribution {({t: dists.get(t) for t in missing})}:\n{missing}")


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
PATHLIKE = re.compile(r"[\w.-]+(/[\w.-]+)*(/|\.[A-Za-z0-9]+)")
SOURCE_ROOTS = ("moelora_lit", "experiments", "docs", "scripts", "benchmarks", "tests", "notebooks", "examples")


def doc_files() -> list[Path]:
    return sorted({p for pattern in DOCS for p in ROOT.glob(pattern)})


def named_paths(doc: Path) -> Iterator[tuple[str, int, bool]]:
    """(path, line, is a link) for markdown links and backticked repository paths outside code blocks."""
    fenced = False
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        for target in LINK.findall(line):
            if not re.match(r"[a-z][a-z0-9+.-]*:|#", target):  # not a URL or an anchor
                yield target.split("#")[0], number, True
        for span in CODE.findall(line):
            for token in re.split(r"[\s=,;()]+", span.strip()):
                token = token.strip("'\".:")
                if "/" in token and PATHLIKE.fullmatch(token) and token.split("/")[0] in SOURCE_ROOTS:
                    yield token, number, False


def test_every_path_the_docs_name_exists() -> None:
    missing, checked = [], 0
    for doc in doc_files():
        for path, line, is_link in named_paths(doc):
            checked += 1
            bases = (doc.parent,) if is_link else (ROOT, doc.parent)
            if not any((base / path).exists() for base in bases):
                missing.append(f"{doc.relative_to(ROOT)}:{line}: {path}")
    assert checked > 20
    assert not missing, "paths named in the docs that are not in the repository:\n" + "\n".join(missing)


def test_path_finder_reads_links_and_backticked_paths(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("See [the design](docs/design.md#one) and `moelora_lit/eval/` or `python -m x --config "
                   "experiments/a.yaml`, not [a site](https://x.org/a.md), `runs/out/`, `<dir>/x.json`, `a/b`.\n"
                   "```\nmoelora_lit/not_checked.py\n```\n")
    assert [p for p, _, _ in named_paths(doc)] == ["docs/design.md", "moelora_lit/eval/", "experiments/a.yaml"]
