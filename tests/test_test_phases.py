"""scripts/test-phases.sh, the pytest part of the README's test command (scripts/test.sh), run on a
small project of its own: the user's arguments compose with each phase's selection (a -m restricts
both phases, and no test runs in both or in the wrong one), -n and the like are refused in one line,
and a phase that collects nothing (pytest's exit 5) fails the run unless the user's selection left it
empty while the other phase ran tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "test-phases.sh"

INI = """[pytest]
markers =
    serial: alone
    slow: slow
"""

TESTS = """import os
import pytest


def _log(name):
    with open(os.environ["PHASE_LOG"], "a") as f:
        f.write(f"{name} {'workers' if os.environ.get('PYTEST_XDIST_WORKER') else 'alone'}\\n")


def test_plain():
    _log("plain")


@pytest.mark.slow
def test_slow():
    _log("slow")


@pytest.mark.serial
def test_lone():
    _log("lone")


@pytest.mark.serial
@pytest.mark.slow
def test_lone_slow():
    _log("lone_slow")


@pytest.mark.serial
def test_lone_fails():
    _log("lone_fails")
    assert os.environ.get("FAIL") != "1"
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "pytest.ini").write_text(INI)
    (tmp_path / "test_a.py").write_text(TESTS)
    return tmp_path


def _run(project: Path, *args: str, fail: bool = False) -> tuple[int, list[str], str]:
    """Exit status, the tests run as "name phase" (sorted), stderr."""
    log = project / "log"
    log.unlink(missing_ok=True)
    # Not this run's worker: its PYTEST_XDIST_WORKER would make every test look run by workers.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env |= {"PHASE_LOG": str(log), "CKPT_VENV": sys.prefix, "FAIL": str(int(fail))}
    # Only xdist, which the workers' phase needs: the small project uses no other plugin, and
    # hypothesis's, loaded by each of a phase's three interpreters, took 2/3 of every run (~2 s of
    # ~3 s; this file's runs were ~75 s of a suite run's CPU).
    env |= {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTEST_PLUGINS": "xdist.plugin"}
    p = subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    ran = sorted(log.read_text().splitlines()) if log.exists() else []
    return p.returncode, ran, p.stderr


def test_no_arguments_run_each_test_once_in_its_phase(project: Path) -> None:
    rc, ran, _ = _run(project)
    assert rc == 0
    assert ran == ["lone alone", "lone_fails alone", "lone_slow alone", "plain workers", "slow workers"]


def test_a_mark_expression_restricts_both_phases(project: Path) -> None:
    rc, ran, _ = _run(project, "-m", "slow")
    assert rc == 0
    assert ran == ["lone_slow alone", "slow workers"]
    rc, ran, _ = _run(project, "-m", "not slow", "-k", "plain or lone")
    assert rc == 0
    assert ran == ["lone alone", "lone_fails alone", "plain workers"]


def test_a_selection_in_one_phase_only_passes(project: Path) -> None:
    rc, ran, _ = _run(project, "-k", "lone and not fails")  # the workers' phase collects nothing
    assert rc == 0
    assert ran == ["lone alone", "lone_slow alone"]
    rc, ran, _ = _run(project, f"{project}/test_a.py::test_plain")  # the serial phase: nothing
    assert rc == 0
    assert ran == ["plain workers"]


def test_nothing_selected_fails(project: Path) -> None:
    rc, ran, _ = _run(project, "-k", "no_such_test")
    assert rc == 5 and ran == []
    rc, ran, _ = _run(project, "-mslow and not slow")
    assert rc == 5 and ran == []


def test_an_option_value_is_not_a_selection(project: Path) -> None:
    """`--maxfail 3`'s 3 selects nothing: the workers' phase collecting nothing still fails the run,
    while a path or a node id given beside it selects."""
    only_serial = '@pytest.mark.serial\ndef test_only():\n    _log("only")\n'
    (project / "test_a.py").write_text(TESTS.split("def test_plain")[0] + only_serial)
    for args in (["--maxfail", "3"], ["--maxfail", "3", "-x", "--log-level", "INFO"]):
        rc, ran, _ = _run(project, *args)
        assert rc == 5 and ran == ["only alone"], args
    for args in (["--maxfail", "3", "test_a.py"], ["--maxfail", "3", "test_a.py::test_only"]):
        rc, ran, _ = _run(project, *args)
        assert rc == 0 and ran == ["only alone"], args


def test_a_failure_in_the_serial_phase_fails(project: Path) -> None:
    rc, ran, _ = _run(project, "-k", "plain or fails", fail=True)
    assert rc == 1
    assert ran == ["lone_fails alone", "plain workers"]


@pytest.mark.parametrize("args", [["-n", "3"], ["-n4"], ["--numprocesses=2"], ["-d"], ["--dist", "load"]])
def test_worker_options_are_refused_in_one_line(project: Path, args: list[str]) -> None:
    rc, ran, err = _run(project, *args)
    assert rc == 2 and ran == []
    assert err.count("\n") == 1 and err.startswith(f"scripts/test.sh: {args[0]} refused"), err
