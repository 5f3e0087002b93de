"""The package's shape: imports go one way (no cycles, function-level imports included), and
process-global effects live only in the application shells (commands, cli, training.shell)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gpt2"
SHELLS = ("gpt2.cli", "gpt2.__main__", "gpt2.commands", "gpt2.training.shell")
# A pool worker of `gpt2 prepare` ignores Ctrl-C so only the parent handles it: set in the child process.
ALLOWED_GLOBAL_EFFECTS = {("gpt2.prepare.encode", "signal.signal")}
GLOBAL_EFFECTS = ("os.environ", "os.getenv", "signal.signal", "torch.set_float32_matmul_precision", "mallopt")


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """gpt2 modules imported anywhere in the file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpt2"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gpt2"))
    return {m for m in found if m in known}


def test_no_import_cycles():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    # A package's __init__ is imported whenever one of its modules is: edges to it come with the module.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if node.startswith(dep + "."):  # a module of a package importing its own __init__ re-exports
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_library_code_has_no_process_global_effects():
    offenders = []
    for name, path in modules().items():
        if name.startswith(SHELLS):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Attribute, ast.Name)):
                text = ast.unparse(node)
                if text in GLOBAL_EFFECTS and (name, text) not in ALLOWED_GLOBAL_EFFECTS:
                    offenders.append(f"{name}: {text}")
    assert not offenders, offenders


def test_library_never_imports_the_command_line():
    known = modules()
    for name, path in known.items():
        if name.startswith(SHELLS):
            continue
        bad = {m for m in imports(path, known) if m.startswith(("gpt2.cli", "gpt2.commands"))}
        assert not bad, f"{name} imports {bad}"
