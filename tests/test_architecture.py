"""The layering of docs/architecture.md holds: every import of every module of the package
(also inside functions) goes to its own layer or an earlier one, the compiled kernels are
reached only through the ops layer, and the imports form no cycle. The table in the
document is the rule, read from it here, so the two cannot drift apart."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastlaplace"
DOC = ROOT / "docs" / "architecture.md"
KERNELS = "fastlaplace._C"  # compiled, not a Python file
# Named in the table before they exist (added on other branches); once they
# exist they are checked like any other module.
PENDING: set[str] = set()


def module_name(path: str) -> str:
    """``data/loaders.py`` -> ``fastlaplace.data.loaders``; ``__init__.py`` -> ``fastlaplace``."""
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["fastlaplace", *parts])


def read_layers() -> dict[str, int]:
    """{module: layer number} from the document's table."""
    layers: dict[str, int] = {}
    for line in DOC.read_text().splitlines():
        row = re.match(r"\|\s*(\d+)\s+[^|]*\|([^|]*)\|", line)
        if row:
            for path in re.findall(r"`([^`]+)`", row.group(2)):
                name = module_name(path)
                assert name not in layers, f"{path} is in two rows of {DOC.name}"
                layers[name] = int(row.group(1))
    return layers


def package_modules() -> dict[str, Path]:
    return {module_name(p.relative_to(PACKAGE).as_posix()): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The fastlaplace modules that ``name`` imports, wherever in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "fastlaplace")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fastlaplace":
                continue
            for alias in node.names:  # ``from . import ops`` imports the module fastlaplace.ops
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return found


LAYERS = read_layers()
MODULES = package_modules()
KNOWN = set(LAYERS) | set(MODULES)
GRAPH = {name: imports(name, path, KNOWN) for name, path in MODULES.items()}


def test_the_table_names_every_module_and_only_modules():
    assert LAYERS, f"no layer table found in {DOC}"
    unplaced = sorted(set(MODULES) - set(LAYERS))
    assert not unplaced, f"modules missing from the table of {DOC.name}: {unplaced}"
    missing = sorted(set(LAYERS) - set(MODULES) - PENDING - {KERNELS, "fastlaplace._build_config"})
    assert not missing, f"{DOC.name} names modules that do not exist: {missing}"
    assert LAYERS[KERNELS] == 0


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_respect_the_layers(name):
    layer = LAYERS[name]
    for target in sorted(GRAPH[name]):
        assert target in LAYERS, f"{name} imports {target}, which is not in the table of {DOC.name}"
        assert LAYERS[target] <= layer, (f"{name} (layer {layer}) imports {target} (layer {LAYERS[target]}): "
                                         f"a later layer, see {DOC.name}")
        if target == KERNELS:
            assert layer == 1, f"{name} (layer {layer}) imports the compiled kernels: only the ops layer may"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name, path):
        state[name] = 1
        for target in sorted(GRAPH.get(name, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_the_programs_do_not_import_train():
    """A run is rebuilt in one place: evaluate, uncertainty and plot rebuild a run through runs."""
    assert not [n for n, targets in GRAPH.items() if "fastlaplace.train" in targets]
    for program in ("fastlaplace.evaluate", "fastlaplace.uncertainty", "fastlaplace.plot"):
        assert "fastlaplace.runs" in GRAPH[program]


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """Lazy imports count: one inside a function is found like one at the top."""
    path = tmp_path / "module.py"
    path.write_text("def f():\n    from .train import main\n    from . import ops, cli\n")
    known = {"fastlaplace.train", "fastlaplace.ops", "fastlaplace.cli"}
    assert imports("fastlaplace.evaluate", path, known) == known
    (tmp_path / "__init__.py").write_text("from .. import cli\nfrom ..runs import build\n")
    assert imports("fastlaplace.data", tmp_path / "__init__.py", known) == {"fastlaplace.cli", "fastlaplace.runs"}


def test_where_things_go_names_what_exists():
    """The recipes of "Where things go" stay true to the code: every file they name exists
    (in the repository or the package) and every ``module.name`` resolves."""
    import importlib

    recipes = DOC.read_text().split("## Where things go", 1)[1]
    missing = []
    for token in sorted(set(re.findall(r"`([^`]+)`", recipes))):
        if "*" in token:
            continue
        if re.fullmatch(r"[\w./-]+/|[\w./-]+\.(py|h|cpp|md)", token):
            if not ((ROOT / token).exists() or (PACKAGE / token).exists()):
                missing.append(token)
            continue
        dotted = re.fullmatch(r"(\w+)\.([\w.]+)(\(\))?", token)
        if dotted and f"fastlaplace.{dotted[1]}" in MODULES:
            target = importlib.import_module(f"fastlaplace.{dotted[1]}")
            for attr in dotted[2].split("."):
                target = getattr(target, attr, None)
            if target is None:
                missing.append(token)
    assert not missing, f"{DOC.name}, 'Where things go', names what does not exist: {missing}"
