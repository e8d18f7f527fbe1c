"""Which tier a test belongs to, read from its code: `e2e` when it runs a program, `fast` otherwise.

A test runs a program when its body, a function of its module it calls (at any depth) or a fixture it uses
(its own module's or conftest.py's, at any depth) does one of:
- calls `main` of a program module (buffer, distill, evaluate, the pipeline, export) or anything of
  comparison's pipeline, programs, methods, regimes or sweep (their stages and launcher run programs);
- uses `run_program` (conftest: a program through its command-line boundary), `subprocess` or `runpy`.
The rule errs on the side of `e2e` (a test that only reads comparison.pipeline.load_config counts as one),
never the other way. Marks written by hand are kept: `distributed` (torchrun) and `slow` (a unit test that
runs no program but takes seconds: big encoders, long unrolls). `fast` is what is left: `pytest -m fast`
while editing, `make test` for everything.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PROGRAM_MODULES = {"buffer", "distill", "evaluate", "pipeline", "export", "reduce"}  # `pipeline` is comparison.pipeline in tests
RUNNER_MODULES = {"pipeline", "programs", "methods", "regimes", "sweep", "reduced"}  # comparison/: these run programs
RUNNER_NAMES = {"run_program", "subprocess", "runpy"}
HAND_TIERS = ("e2e", "slow", "distributed")


class _Module:
    """One test module's top-level functions (fixtures and helpers by name, test methods as Class.name),
    the names each one uses, and which of them run a program."""

    def __init__(self, path: Path):
        tree = ast.parse(path.read_text(), filename=str(path))
        self.runner_aliases = set(RUNNER_NAMES)  # names that run a program when used
        self.program_modules = set(PROGRAM_MODULES)  # names bound to a program module: `.main` runs it
        self.runner_modules = set(RUNNER_MODULES)    # names bound to a module whose every function may
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                root = node.module.split(".")[-1]
                for alias in node.names:
                    bound = alias.asname or alias.name
                    # `from distill import main as distill_main`, `from comparison.programs import launch`
                    if (root in PROGRAM_MODULES and alias.name == "main") or root in RUNNER_MODULES:
                        self.runner_aliases.add(bound)
                    elif alias.name in RUNNER_MODULES:  # `from comparison import regimes as bench_regimes`
                        self.runner_modules.add(bound)
                    elif alias.name in PROGRAM_MODULES:
                        self.program_modules.add(bound)
        self.uses: dict[str, set[str]] = {}
        self.direct: set[str] = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._read(node.name, node)
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        self._read(f"{node.name}.{item.name}", item)

    def _read(self, name: str, function: ast.AST) -> None:
        used: set[str] = set()
        for node in ast.walk(function):
            if isinstance(node, ast.Name):
                used.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                owner = node.value.id
                if (owner in self.program_modules and node.attr == "main") or owner in self.runner_modules:
                    self.direct.add(name)
        if used & self.runner_aliases:
            self.direct.add(name)
        self.uses[name] = used | {arg.arg for arg in function.args.args}  # fixtures arrive as arguments

    @lru_cache(maxsize=None)
    def runs_program(self, name: str, conftest: "_Module | None" = None) -> bool:
        return self._runs(name, conftest, frozenset())

    def _runs(self, name: str, conftest: "_Module | None", seen: frozenset) -> bool:
        if name not in self.uses:  # a fixture or helper of conftest.py (it has names of its own: a fresh `seen`)
            return conftest is not None and conftest._runs(name, None, frozenset())
        if name in seen:
            return False
        if name in self.direct:
            return True
        return any(self._runs(used, conftest, seen | {name}) for used in self.uses[name]
                   if used != name and (used in self.uses or conftest is not None))


@lru_cache(maxsize=None)
def _module(path: str) -> _Module:
    return _Module(Path(path))


def runs_program(test_file: Path, qualified_name: str, fixtures: list[str]) -> bool:
    """Whether the test `qualified_name` (`test_x` or `TestClass.test_x`) of `test_file`, using `fixtures`,
    runs a program."""
    module = _module(str(test_file))
    conftest_path = test_file.parent / "conftest.py"
    conftest = _module(str(conftest_path)) if conftest_path.exists() else None
    names = [qualified_name, *fixtures]
    return any(module.runs_program(name, conftest) for name in names)


def assign(items) -> None:
    """Give every collected test its tier mark (called by conftest's collection hook)."""
    import pytest

    for item in items:
        if any(item.get_closest_marker(tier) for tier in HAND_TIERS):
            continue
        function = getattr(item, "originalname", None) or item.name
        qualified = f"{item.cls.__name__}.{function}" if getattr(item, "cls", None) else function
        fixtures = list(getattr(item, "fixturenames", ()))
        if runs_program(Path(str(item.fspath)), qualified, fixtures):
            item.add_marker(pytest.mark.e2e)
        else:
            item.add_marker(pytest.mark.fast)
