"""The import rules of the house (docs/architecture.md, "Layers"), read with `ast` from the source tree:
every module imports only from its own layer or below, and no modules import each other in a circle.
Imports inside functions count too: a lazy import is still a dependency."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module belongs to the longest prefix listed here.
LAYERS = [
    ("ldm.errors", "ldm.config", "ldm.diffusion", "ldm.visualize"),  # facts: no models, no files of runs
    ("ldm.data", "ldm.sampling", "ldm.metrics"),  # data pipeline, samplers, metrics
    ("ldm.modules",),  # network building blocks and conditioners
    ("ldm.models", "ldm.losses"),  # whole networks and their losses
    ("ldm.convert",),  # tensors and configs of other formats <-> our models
    ("ldm.tasks",),  # one stage's training step, evaluation, sampling
    ("ldm.inference",),  # sampling a trained task outside the loop
    ("ldm.training",),  # the run layer: run directories, checkpoints, the loop, parallelism
    ("train", "data", "benchmarks"),  # entry points and dataset tools
]
PACKAGES = ("ldm", "train", "data", "benchmarks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), i
    assert layer is not None, f"{module} is in no layer of LAYERS: add it where it belongs"
    return layer


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports (`from a.b import c` counts `a.b.c` when that is a module)."""
    found = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import ldm.training.loop` -> the module itself
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in PACKAGES:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) - {module_name(p)} for p in files}


def test_every_module_imports_only_its_own_layer_or_below():
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, targets in import_graph().items() for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = import_graph()
    # a package's __init__ re-exporting its submodules is not a circle of the code, so edges into a
    # package's own __init__ from its submodules are left out
    graph = {a: {b for b in targets if not a.startswith(b + ".")} for a, targets in graph.items()}
    state, circles = {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack
                               else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_rules_see_a_violation(tmp_path):
    """The checker itself: an upward import and a circle are found (so a silent pass means something)."""
    modules = {"ldm.data.decode", "ldm.training.loop"}
    (tmp_path / "x.py").write_text("def f():\n    from ldm.training.loop import train\n")
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        assert imports_of(tmp_path / "x.py", modules) == {"ldm.training.loop"}
    finally:
        ROOT = root
    assert layer_of("ldm.training.loop") > layer_of("ldm.data.decode")


def test_the_training_loop_stays_readable():
    """train() reads top to bottom: few names to hold in mind, and no closure over names assigned later
    (helpers are module functions or methods, each with its inputs as arguments)."""
    import types

    from ldm.training.loop import train

    code = train.__code__
    assert code.co_nlocals < 15, f"train() has {code.co_nlocals} locals: {code.co_varnames}"
    nested = [c.co_name for c in code.co_consts if isinstance(c, types.CodeType) and not c.co_name.startswith("<")]
    assert not nested, f"train() defines nested functions {nested}: make them module functions"
