"""The folder layout is the architecture: packages import only the layers below them."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first; a package may import itself and anything listed before it.
LAYERS = ["utils", "settings", "networks", "reparam_module", "data", "experts", "evaluation", "matching",
          "comparison", "buffer", "distill", "evaluate", "pipeline", "bench"]


def project_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found & {*LAYERS, "tests"}


def layer_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_no_import_runs_back_up_the_layers():
    upward = []
    files = [p for p in ROOT.glob("*.py")] + [p for layer in LAYERS for p in (ROOT / layer).glob("*.py")]
    for path in files:
        layer = layer_of(path)
        if layer not in LAYERS:
            continue
        allowed = set(LAYERS[:LAYERS.index(layer) + 1])
        if layer in ("buffer", "distill", "evaluate", "pipeline"):  # programs sit side by side
            allowed |= {"buffer", "distill", "evaluate", "pipeline"}
        upward += [f"{path.relative_to(ROOT)} imports {name}" for name in project_imports(path) - allowed]
    assert upward == []


def test_tests_and_benchmarks_stay_apart_and_nothing_edits_sys_path():
    for path in (ROOT / "tests").glob("*.py"):
        assert "bench" not in project_imports(path), path
    for path in (ROOT / "bench").glob("*.py"):
        assert "tests" not in project_imports(path), path
    for path in [*ROOT.glob("*.py"), *ROOT.glob("*/*.py")]:
        if ".venv" not in path.parts and path != Path(__file__).resolve():
            assert "sys.path.insert" not in path.read_text() and "sys.path[:0]" not in path.read_text(), path


def test_no_package_holds_more_than_a_quarter_of_the_code():
    counts = {layer: sum(len(p.read_text().splitlines()) for p in (ROOT / layer).glob("*.py"))
              for layer in LAYERS if (ROOT / layer).is_dir()}
    total = sum(counts.values()) + sum(len(p.read_text().splitlines()) for p in ROOT.glob("*.py"))
    assert max(counts.values()) <= total / 4, counts
