"""The package's shape, as the README's Layout section draws it: no import cycles, front ends that reach
engines only through `rmbg_demo.engines`' public names, and `cluster/` that needs no CLI."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rmbg_demo"
FRONT_ENDS = ("rmbg_demo.cli", "rmbg_demo.ui", "rmbg_demo.ui_video", "rmbg_demo.cluster.job",
              "rmbg_demo.cluster.serve", "rmbg_demo.cluster.serve_app", "rmbg_demo.arguments",
              "rmbg_demo.service.app", "rmbg_demo.service.removebg", "rmbg_demo.service.core")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every rmbg_demo module `path` imports, at the top or inside functions (a lazy import is still an
    edge: it runs sooner or later)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("rmbg_demo")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("rmbg_demo"):
                continue
            found.add(target)
            for alias in node.names:  # `from . import storage` imports a module
                if (PACKAGE.parent / Path(*f"{target}.{alias.name}".split("."))).with_suffix(".py").exists():
                    found.add(f"{target}.{alias.name}")
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        # A module's own package __init__ runs before it: not an edge of its design.
        edges[name] = {t for t in imports_of(path) if t in modules and t != name and not name.startswith(t + ".")}
    return edges


def test_the_package_has_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycle = trail[trail.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_the_cycle_check_sees_a_lazy_import(tmp_path):
    module = tmp_path / "rmbg_demo" / "cluster" / "job.py"
    module.parent.mkdir(parents=True)
    module.write_text("def f():\n    from ..cli import main\n    from .. import storage\n")
    (tmp_path / "rmbg_demo" / "storage.py").write_text("")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "rmbg_demo"
    try:
        assert imports_of(module) == {"rmbg_demo.cli", "rmbg_demo", "rmbg_demo.storage"}
    finally:
        PACKAGE = saved


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_front_ends_reach_engines_only_through_the_package(front_end):
    edges = graph()
    internals = {name for name in edges if name.startswith("rmbg_demo.engines.")}
    assert not edges[front_end] & internals, f"{front_end} imports {sorted(edges[front_end] & internals)}"


def test_cluster_needs_no_cli():
    edges = graph()
    for name in (n for n in edges if n.startswith("rmbg_demo.cluster")):
        assert "rmbg_demo.cli" not in edges[name], name
