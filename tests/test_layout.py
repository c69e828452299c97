"""The import rule of the layout (README "Layout", ../shared/design.md), checked on the source with ast.

Every import counts, at module level or inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("corelab", "phantoms", "expectations", "accreditation", "reports", "services", "tasks", "portal", "flows")
FIRST_PARTY = (*PRODUCT, "synth", "bench", "tests")
PREFECT = ("prefect", "prefect_dask")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def imports() -> dict[str, set[str]]:
    """Module name -> the modules it imports (absolute names; relative imports resolved)."""
    out: dict[str, set[str]] = {}
    for package in FIRST_PARTY:
        for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []:
            name = _module_name(path)
            is_package = path.name == "__init__.py"
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                        module = ".".join(base + ([node.module] if node.module else []))
                    else:
                        module = node.module or ""
                    found.add(module)
                    # "from synth import trial" imports the module synth.trial
                    found.update(f"{module}.{alias.name}" for alias in node.names
                                 if _is_module(f"{module}.{alias.name}"))
            out[name] = found
    return out


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _top(module: str) -> str:
    return module.split(".")[0]


def _offences(importers: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{module} imports {target}" for module, targets in imports().items()
                  if _top(module) in importers for target in targets if _top(target) in forbidden)


def test_the_source_is_found():
    assert {"corelab.dicomio", "corelab.grid", "synth.trial", "bench.receive", "tests.test_layout"} <= set(imports())


def test_the_kernel_imports_nothing_above_it():
    assert _offences(("corelab",), tuple(p for p in FIRST_PARTY if p != "corelab")) == []


def test_phantoms_import_only_the_kernel():
    assert _offences(("phantoms",), tuple(p for p in FIRST_PARTY if p not in ("corelab", "phantoms"))) == []


def test_synthesis_is_imported_by_no_product_package_but_flows():
    """The synthetic trial is test and demo data; of the product, only the demo and synth commands reach it."""
    assert _offences(tuple(p for p in PRODUCT if p != "flows"), ("synth",)) == []


def test_bench_is_imported_by_no_product_code_nor_by_tests_or_synth():
    assert _offences((*PRODUCT, "synth", "tests"), ("bench",)) == []


def test_tests_are_imported_by_nothing_but_tests():
    assert _offences((*PRODUCT, "synth", "bench"), ("tests",)) == []


def test_prefect_only_in_tasks_and_flows():
    assert _offences(tuple(p for p in PRODUCT if p not in ("tasks", "flows")) + ("synth",), PREFECT) == []


def _cycles_between(nodes_of) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for module, targets in imports().items():
        graph.setdefault(nodes_of(module), set()).update(nodes_of(t) for t in targets if _top(t) in FIRST_PARTY)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w == v:
                continue
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_circle_between_packages():
    assert _cycles_between(_top) == []


@pytest.mark.parametrize("package", FIRST_PARTY)
def test_no_import_circle_between_modules(package):
    """Within and across packages: a module never reaches itself through its imports.

    A package's ``__init__`` counts as its own node, so ``from synth import trial`` is an edge to
    ``synth.trial`` (and to ``synth``).
    """
    cycles = [c for c in _cycles_between(lambda m: m) if _top(c[0]) == package]
    assert cycles == []
