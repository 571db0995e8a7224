"""The layers of the repository, checked over its import graph (built with ``ast``, every import
statement, at module level or inside a function):

* a phase script imports the package ``thoracic_seg``, ``dataset_multi_organ`` and
  ``unet_multi_organ``, never another phase script;
* the library (the package, ``dataset_multi_organ``, ``unet_multi_organ``) imports no phase script,
  and the package no ``dataset_multi_organ``;
* the torch-only modules (the model, losses, precision, the inference core) and every repository
  module they import reach neither SimpleITK nor pydicom, so a GPU check runs with PyTorch alone;
* there is no import cycle.

Benchmarks, tests and the notebook may call a phase script's ``run()``/``main()``; they are not
checked here.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "thoracic_seg"
PHASE_SCRIPTS = frozenset({
    "make_synthetic_cohort", "convert_dicom_to_nifti", "extract_multi_organ_masks", "normalize_ct_and_masks",
    "prepare_train_val_test_splits", "train_multi_organ", "evaluate_multi_organ", "predict_multi_organ",
    "visualize_all_phases", "export_nnunet",
})
LIBRARY_TOP_LEVEL = frozenset({"dataset_multi_organ", "unet_multi_organ"})
TORCH_ONLY = frozenset({"unet_multi_organ", f"{PACKAGE}.losses", f"{PACKAGE}.precision", f"{PACKAGE}.inference"})
FORBIDDEN_IN_TORCH_ONLY = ("SimpleITK", "pydicom")


def repository_modules(root: Path = REPO) -> dict[str, Path]:
    """Module name -> file of every top-level script and package module, the package's
    ``__init__`` as ``thoracic_seg`` (not tests or benchmarks)."""
    modules = {path.stem: path for path in root.glob("*.py")}
    modules.update({f"{PACKAGE}.{path.stem}" if path.stem != "__init__" else PACKAGE: path
                    for path in (root / PACKAGE).glob("*.py")})
    return modules


def imports_of(source: str, known: set[str], package: str = "") -> set[str]:
    """The modules a source imports (anywhere in it): repository modules by their names, other
    packages by their top-level name (``SimpleITK``, ``pydicom``, ``torch``...). ``package``: the
    package a relative import (``from .grid import x``) is relative to."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = ".".join(filter(None, [package] * bool(node.level) + [node.module or ""]))
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name in known:
                found.add(name)
            elif name.split(".")[0] != PACKAGE:  # thoracic_seg.grid.body_box is a name, not a module
                found.add(name.split(".")[0])
    return found


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the modules it imports; a package module also imports its package's ``__init__``."""
    known = set(sources)
    graph = {}
    for name, source in sources.items():
        package = name.rpartition(".")[0] if name != PACKAGE else PACKAGE
        graph[name] = imports_of(source, known, package) - {name}
        if package and package in known and name != package:
            graph[name].add(package)
    return graph


def layer_violations(graph: dict[str, set[str]], phase_scripts=PHASE_SCRIPTS,
                     torch_only=TORCH_ONLY) -> list[str]:
    """One line per broken rule (module docstring); empty when the layers hold."""
    problems = []
    for module, imported in sorted(graph.items()):
        in_repo = {m for m in imported if m in graph}
        for other in sorted(in_repo & phase_scripts):
            what = "phase script" if module in phase_scripts else "library module"
            problems.append(f"{what} {module} imports the phase script {other}")
        if module.startswith(f"{PACKAGE}.") and "dataset_multi_organ" in in_repo:
            problems.append(f"{module} imports dataset_multi_organ (the package stands below it)")
    for module in sorted(torch_only & set(graph)):
        seen, stack = {module}, [module]
        while stack:
            current = stack.pop()
            for imported in sorted(graph.get(current, ())):
                if imported in FORBIDDEN_IN_TORCH_ONLY:
                    problems.append(f"torch-only {module} reaches {imported} (through {current})")
                elif imported in graph and imported not in seen:
                    seen.add(imported)
                    stack.append(imported)
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in import_cycles(graph)]
    return problems


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) per strongly connected group of repository modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(m for m in graph[node] if m in graph):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group) + [sorted(group)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_repository_keeps_its_layers():
    sources = {name: path.read_text(encoding="utf-8") for name, path in repository_modules().items()}
    graph = import_graph(sources)
    top_level = {name for name in graph if "." not in name and name != PACKAGE}
    assert top_level == PHASE_SCRIPTS | LIBRARY_TOP_LEVEL  # a new script must be placed in a layer
    assert TORCH_ONLY <= set(graph)
    assert layer_violations(graph) == []


@pytest.mark.parametrize("sources, problem", [
    ({"evaluate_multi_organ": "from train_multi_organ import BEST_CHECKPOINT",
      "train_multi_organ": "import numpy"}, "phase script evaluate_multi_organ imports the phase script train_multi_organ"),
    ({"thoracic_seg.figures": "def f():\n    import normalize_ct_and_masks",
      "normalize_ct_and_masks": ""}, "library module thoracic_seg.figures imports the phase script normalize_ct_and_masks"),
    ({"thoracic_seg.grid": "from dataset_multi_organ import context_stack", "dataset_multi_organ": ""},
     "thoracic_seg.grid imports dataset_multi_organ"),
    ({"thoracic_seg.inference": "from thoracic_seg.grid import body_box",
      "thoracic_seg.grid": "import SimpleITK as sitk"}, "torch-only thoracic_seg.inference reaches SimpleITK"),
    ({"unet_multi_organ": "def load():\n    from pydicom import dcmread"}, "torch-only unet_multi_organ reaches pydicom"),
    ({"thoracic_seg.a": "from thoracic_seg import b", "thoracic_seg.b": "def f():\n    import thoracic_seg.a"},
     "import cycle: thoracic_seg.a -> thoracic_seg.b -> thoracic_seg.a"),
    ({"thoracic_seg.inference": "from .grid import body_box", "thoracic_seg.grid": "import pydicom"},
     "torch-only thoracic_seg.inference reaches pydicom"),                    # a relative import
    ({"thoracic_seg.losses": "import torch", "thoracic_seg": "from thoracic_seg import cases",
      "thoracic_seg.cases": "import SimpleITK"}, "torch-only thoracic_seg.losses reaches SimpleITK"),  # via __init__
])
def test_each_rule_fails_when_broken(sources, problem):
    problems = layer_violations(import_graph(sources))
    assert any(p.startswith(problem) for p in problems), problems

