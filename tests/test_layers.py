"""The package's import structure (issue 17): no import cycle, and no module imports from a layer above it.

Every ``import`` / ``from ... import`` inside ``src/brainseg`` counts, the ones inside functions too (a lazy import
that dodges a cycle is still a cycle). The layers, bottom to top:

0. ``config``, ``models``, ``evaluation.metrics``, ``evaluation.measure``, ``display.review``, ``io.files`` (values,
   maths, networks, atomic files) and the folders' ``__init__`` files
1. ``io`` (datasets, channels, volumes, DICOM, the synthetic slice), ``preprocessing``, ``models.checkpoint``,
   ``display.visualize``, ``training.cache`` (reading inputs, preparing them, drawing)
2. ``inference.backends``, ``inference.registry``, ``inference.export``, ``evaluation.protocol``,
   ``training.trainer`` (networks run, the schema, metrics over patients, training)
3. ``inference.predictor`` (the one loader), ``inference.predict``, ``display.report``, ``evaluation.compare``,
   ``evaluation.brats``, ``pipeline``, ``io.dicomweb`` (what users run)
4. ``serving`` (the service) and ``inference.batch``
5. ``cli``

The folders show the pipeline's stages (io -> preprocessing -> models -> training -> inference -> evaluation ->
display -> serving); the layers order the modules by what they may import, so one folder can span layers.
A module's layer is that of its longest listed prefix (``inference.predictor`` before ``inference``).

A module may import from its own layer or any layer below, never above.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "brainseg"

LAYERS = [
    {"brainseg", "config", "models", "evaluation.metrics", "evaluation.measure", "display.review", "io.files"}
    | {"inference", "evaluation", "display", "training"},
    {"io", "preprocessing", "models.checkpoint", "display.visualize", "training.cache"},
    {"inference.backends", "inference.registry", "inference.export", "evaluation.protocol", "training.trainer"},
    {"inference.predictor", "inference.predict", "display.report", "evaluation.compare", "evaluation.brats", "pipeline", "io.dicomweb"},
    {"serving", "inference.batch"},
    {"cli"},
]


def modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (relative and absolute, at any depth of the file)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) if node.level else node.module
            if not base or not base.startswith("brainseg"):
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def layer_of(module: str) -> int:
    parts = module.split(".")[1:] or ["brainseg"]
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        for i, layer in enumerate(LAYERS):
            if key in layer:
                return i
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it where it belongs")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle_and_an_upward_import():
    """The checks themselves can fail: a made-up graph with a cycle and an upward edge."""
    edges = {
        "brainseg.inference.registry": {"brainseg.inference.backends"},
        "brainseg.inference.backends": {"brainseg.inference.registry", "brainseg.cli"},
        "brainseg.cli": set(),
    }
    assert cycles(edges) == [["brainseg.inference.backends", "brainseg.inference.registry"]]
    assert layer_of("brainseg.inference.backends") < layer_of("brainseg.cli")


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_no_upward_import():
    upward = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})" for m, deps in graph().items() for d in deps if layer_of(d) > layer_of(m)]
    assert upward == []


def test_only_the_predictor_loads_models():
    """``predictor`` is the one loader: no other module builds a backend from a file."""
    loaders = ("load_backend(", "OnnxBackend(", "load_segmenter(")
    allowed = {"predictor.py", "backends.py"}  # inference.backends defines them; inference.predictor calls them
    offenders = [
        f"{f.relative_to(SRC)}: {word}"
        for f in SRC.rglob("*.py")
        if f.name not in allowed
        for word in loaders
        if word in f.read_text() and f"def {word}" not in f.read_text()
    ]
    assert offenders == []


def test_no_function_over_60_lines():
    """Every function of src/ reads on one screen (docstring included)."""
    long = []
    for f in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{f.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
