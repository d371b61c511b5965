"""No import circles in the package: its modules' imports of each other (at the top or inside functions) form a
graph without cycles, and registration with peft happens once, in the package's __init__."""

import ast
import subprocess
import sys

import pytest

from conftest import ROOT

PACKAGE = ROOT / "memory_peft"


def package_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports, wherever the import statement stands."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
                imported.update(name for name in names if name in modules)
        graph[path.stem] = imported - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        stack.pop()
        return []

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return []


def test_no_import_circles():
    graph = package_imports()
    assert {"config", "storage", "registration", "model", "layer"} <= set(graph)
    assert find_cycle(graph) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail


def test_registration_happens_once_in_the_package_init():
    registering = [path.name for path in PACKAGE.glob("*.py") if "register_peft_method(" in path.read_text()]
    assert registering == ["__init__.py"]


@pytest.mark.parametrize("module", ["registration", "storage", "config", "layer", "model", "settings"])
def test_a_core_module_imports_in_a_fresh_interpreter(module):
    code = f"import memory_peft.{module}, peft; assert peft.PeftType.MEMORY_TOKENS"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
