"""The modules of ``lorapro.cli`` import each other without a circle (module- and function-level imports alike),
and the package outside the CLI never imports the CLI (``python -m lorapro``'s ``__main__`` aside)."""

from __future__ import annotations

import ast
from pathlib import Path

import lorapro

PACKAGE = Path(lorapro.__file__).parent
CLI = PACKAGE / "cli"


def _cli_imports(path: Path) -> set[str]:
    """The ``lorapro.cli`` modules that ``path`` (a module of ``lorapro.cli``) imports anywhere in its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lorapro.cli."):
            names.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[2] for a in node.names if a.name.startswith("lorapro.cli."))
    return {n for n in names if (CLI / f"{n}.py").is_file()}


def test_the_cli_modules_import_each_other_without_a_circle():
    graph = {p.stem: _cli_imports(p) for p in CLI.glob("*.py") if p.stem != "__init__"}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import circle: " + " -> ".join((*path, module))
        if module in done:
            return
        for other in sorted(graph[module]):
            visit(other, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def _absolute(node: ast.ImportFrom | ast.Import, package: tuple[str, ...]) -> list[str]:
    """The modules (or the names that may be modules) an import statement in ``package`` imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = package[: len(package) - node.level + 1] if node.level else ()
    module = ".".join((*base, node.module)) if node.module else ".".join(base)
    return [module] if node.module else [f"{module}.{a.name}" for a in node.names]


def test_the_core_and_the_integrations_never_import_the_cli():
    for path in PACKAGE.rglob("*.py"):
        if CLI in path.parents or path == PACKAGE / "__main__.py":
            continue
        package = ("lorapro", *path.relative_to(PACKAGE).parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for module in _absolute(node, package):
                    assert not (module == "lorapro.cli" or module.startswith("lorapro.cli.")), (path, module)
