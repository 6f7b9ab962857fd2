"""The package's layers (docs/architecture.md): imports point down only, there are no import cycles (function-level
imports included), and the model code reaches nothing that touches the operating system."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# layer of each ldm module, by prefix (the longest prefix wins); a module may import its own layer and those below
LAYERS = {
    "ldm.errors": 0, "ldm.util": 0, "ldm.lr_scheduler": 0,
    "ldm.backend": 1,
    "ldm.loading": 2,
    "ldm.models": 3, "ldm.modules": 3, "ldm.data": 3,
    "ldm.inference": 4, "ldm.testing": 4,
    "ldm.app": 5,
}
MODEL = ("ldm.models", "ldm.modules", "ldm.data")
OS_MODULES = {"ctypes", "mmap"}  # the C library, madvise/mallopt, memory maps
OS_TEXT = ("/proc/", "madvise", "mallopt", "malloc_trim")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in (ROOT / "ldm").rglob("*.py")}


def _imports(name: str) -> set[str]:
    """Every module ``name`` imports, at any depth of its code (function-level imports included)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, node.level - 1 packages up
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return found


def _ldm_imports(name: str) -> set[str]:
    return {m for m in _imports(name) if m in MODULES and m != name and m != "ldm"}


def _layer(name: str) -> int:
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    assert prefix is not None, f"{name} belongs to no layer: add it to LAYERS and docs/architecture.md"
    return LAYERS[prefix]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    if name == "ldm":
        return
    upward = [m for m in _ldm_imports(name) if _layer(m) > _layer(name)]
    assert not upward, f"{name} (layer {_layer(name)}) imports a higher layer: {upward}"


def test_no_import_cycles():
    graph = {name: _ldm_imports(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_model_code_reaches_nothing_that_touches_the_os():
    reachable, todo = set(), [m for m in MODULES if m.startswith(MODEL)]
    while todo:
        name = todo.pop()
        if name not in reachable:
            reachable.add(name)
            todo.extend(_ldm_imports(name))
    for name in sorted(reachable):
        text = MODULES[name].read_text()
        touching = sorted(OS_MODULES & {m.split(".")[0] for m in _imports(name)})
        touching += [word for word in OS_TEXT if word in text]
        assert not touching, f"{name}, reached from the model code, touches the OS: {touching}"


def test_the_checks_see_function_level_imports():
    assert "ldm.loading.checkpoint" in _ldm_imports("ldm.models.diffusion.ddpm")  # imported inside a method
    assert _layer("ldm.app.run") > _layer("ldm.inference.pipeline") > _layer("ldm.modules.ops")
