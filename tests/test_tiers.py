"""The tiers (tests/tiers.py): a test that runs a program, however indirectly, is never in the fast tier."""
from __future__ import annotations

import textwrap

import pytest

import tiers

CONFTEST = '''
import pytest

@pytest.fixture(scope="session")
def experts(tmp_path_factory):
    import buffer
    buffer.main(["--num_experts", "1"])

@pytest.fixture(scope="session")
def run4(experts):          # runs a program only through the fixture it uses
    return experts

@pytest.fixture()
def data(tmp_path):
    return tmp_path
'''

MODULE = '''
import subprocess
import distill
from comparison import regimes as bench_regimes
from comparison.programs import launch
from evaluate import main as evaluate_main
from conftest import run_program

def helper(path):
    return distill.main(["--save_dir", str(path)])

def indirect(path):
    return helper(path)

def pure(x):
    return x + 1

@pytest.fixture()
def local_run(tmp_path):
    return indirect(tmp_path)

def test_unit(data):
    assert pure(1) == 2

def test_calls_main():
    distill.main([])

def test_through_helpers(tmp_path):
    indirect(tmp_path)

def test_module_alias():
    bench_regimes.main([])

def test_imported_main():
    evaluate_main([])

def test_launcher():
    launch("distill.py", [])

def test_boundary():
    run_program(distill.main, [])

def test_command():
    subprocess.run(["python", "buffer.py"])

def test_conftest_fixture(run4):
    pass

def test_local_fixture(local_run):
    pass

def test_recursion_is_not_a_program(data):
    def again(n):
        return again(n - 1) if n else 0
    again(3)

class TestGroup:
    def test_method_unit(self):
        assert pure(0) == 1

    def test_method_program(self, run4):
        pass
'''


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    module = tmp_path / "test_example.py"
    module.write_text(textwrap.dedent(MODULE))
    return module


@pytest.mark.parametrize("name,fixtures,runs", [
    ("test_unit", ["data", "tmp_path"], False),
    ("test_recursion_is_not_a_program", ["data"], False),
    ("TestGroup.test_method_unit", [], False),
    ("test_calls_main", [], True),
    ("test_through_helpers", ["tmp_path"], True),
    ("test_module_alias", [], True),
    ("test_imported_main", [], True),
    ("test_launcher", [], True),
    ("test_boundary", [], True),
    ("test_command", [], True),
    ("test_conftest_fixture", ["run4", "experts"], True),
    ("test_local_fixture", ["local_run", "tmp_path"], True),
    ("TestGroup.test_method_program", ["run4", "experts"], True),
])
def test_a_test_runs_a_program_when_it_or_anything_it_uses_does(files, name, fixtures, runs):
    assert tiers.runs_program(files, name, fixtures) is runs


def test_the_conftest_fixtures_are_followed_through_each_other(files):
    # pytest hands over the closure of the fixtures; the rule must also follow one fixture's own arguments
    assert tiers.runs_program(files, "test_conftest_fixture", ["run4"]) is True


def test_every_collected_test_has_exactly_one_tier(request):
    names = ("fast", "slow", "e2e", "distributed")
    for item in request.session.items:
        assert sum(item.get_closest_marker(name) is not None for name in names) == 1, item.nodeid
