"""The folder layout is the architecture: packages import only the layers below them."""
from __future__ import annotations

import ast
import symtable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first; a package may import itself and anything listed before it.
LAYERS = ["utils", "settings", "networks", "reparam_module", "data", "experts", "evaluation", "matching", "sharing",
          "reduction", "comparison", "buffer", "distill", "evaluate", "pipeline", "export", "reduce", "bench"]
PROGRAMS = ("buffer", "distill", "evaluate", "pipeline", "export", "reduce")


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
        if layer in PROGRAMS:  # programs sit side by side
            allowed |= set(PROGRAMS)
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


def test_distill_py_only_parses_builds_and_loops():
    """distill.py is a program in the manner of nanoGPT's train.py: short, no class, no function over 80 lines
    and none inside another; the state it keeps and what it writes live in matching/."""
    text = (ROOT / "distill.py").read_text()
    tree = ast.parse(text)
    assert len(text.splitlines()) <= 250
    assert [node.name for node in tree.body if isinstance(node, ast.ClassDef)] == []
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert [f.name for f in functions if f.end_lineno - f.lineno + 1 > 80] == []
    nested = [f"{inner.lineno}" for outer in functions for inner in ast.walk(outer)
              if inner is not outer and isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    assert nested == []


def own_bindings(function: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, int]:
    """The first line on which each name of `function`'s own scope is bound (nested scopes' bodies left out)."""
    lines = {arg.arg: function.lineno for arg in ast.walk(function.args) if isinstance(arg, ast.arg)}
    todo = list(function.body)
    while todo:
        node = todo.pop()
        names = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names = [node.id]
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names = [node.name]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.asname or alias.name.split(".")[0] for alias in node.names]
        for name in names:
            lines[name] = min(lines.get(name, node.lineno), node.lineno)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return lines


def reads_of_later_names(source: str, filename: str) -> list[str]:
    """Nested functions that read a variable of the function around them which it binds only below their `def`:
    such a function works only when called after that line, and nothing says so."""
    functions = {node.lineno: node for node in ast.walk(ast.parse(source))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    found, tables = [], [symtable.symtable(source, filename, "exec")]
    while tables:
        table = tables.pop()
        tables += table.get_children()
        if table.get_type() != "function" or table.get_lineno() not in functions:  # (a lambda, a comprehension)
            continue
        bound = own_bindings(functions[table.get_lineno()])
        found += [f"{child.get_name()} (line {child.get_lineno()}) reads {name}, which {table.get_name()} binds "
                  f"only at line {bound[name]}" for child in table.get_children() if child.get_type() == "function"
                  for name in child.get_frees() if bound.get(name, 0) > child.get_lineno()]
    return found


# The shape of the defect distill.py had: a nested save reading a record that the loop's set-up made later.
LATE_READ = """
def run():
    def save(path):
        write(path, timing)
    prepare()
    timing = {"seconds": 0.0}
    save("last")
"""


def test_no_function_reads_a_variable_bound_below_it():
    """distill()'s nested save read `timing`, which distill() assigned some fifty lines further down; a save
    reached before that line would have raised NameError instead of writing the set. No function of the
    programs or of matching/ may depend on such an order."""
    assert reads_of_later_names(LATE_READ, "example") == ["save (line 3) reads timing, which run binds only at line 6"]
    files = [*ROOT.glob("*.py"), *(ROOT / "matching").glob("*.py")]
    assert [f"{path.name}: {line}" for path in files for line in reads_of_later_names(path.read_text(), str(path))] == []
