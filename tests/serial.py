"""The tests that need the machine to themselves: scripts/test.sh runs them after the two-worker
phase, alone (docs/testing.md). Every other test runs beside another test in the second worker.

Kept in one list, each entry with its reason, so that the split is read in one place; a test may also
carry `@pytest.mark.serial` itself. An entry is a node id, or its prefix up to "::" or "[" (a whole
module, every parametrization of a test). tests/conftest.py marks the items and fails the collection
when an entry of a collected module names no test (a renamed test would silently leave the group)."""

from __future__ import annotations

# Each one spins a CPU hog (tests/test_invisible.py cpu_hog, tests/targets/cpuhog.c) on purpose, to
# show the behaviour on a contended machine: the tracer, the target and the hog on two CPUs. With a
# second worker the hog takes that worker's CPU, and the contention is not the one the test names.
CPU_HOG = (
    "tests/test_invisible.py::test_freezes_and_injections_are_invisible[busy]",
    "tests/test_batch.py::test_batches_are_invisible[busy-real-time]",
    "tests/test_batch.py::test_batches_are_invisible[busy-quiet]",
    "tests/test_tree_thaw.py::test_tree_dump_thaw_ends_each_call_once[busy]",
    "tests/test_tree_thaw.py::test_left_stopped_tree_continues_inside_each_call[busy]",
    "tests/test_thaw_in_syscall.py::test_signal_during_the_thaw_ends_the_call[busy]",
    # cpuhog under a cgroup CPU quota or the duty cycle: a whole CPU until the throttle is on.
    "tests/test_cgthrottle.py",
    "tests/test_cgthrottle_guard.py",
)

# SCHED_FIFO: the runner's own threads (the freezing thread, ckpt's hand-off threads) raised to
# real time beside a cpuhog. A real-time thread of one worker takes a CPU from the other one's
# tests whenever it runs, and these check the policies while that happens.
REAL_TIME = (
    "tests/test_freeze_rt.py",
    "tests/test_migrate_boost.py",
)

SERIAL: tuple[str, ...] = CPU_HOG + REAL_TIME


def matches(nodeid: str, entry: str) -> bool:
    return nodeid == entry or nodeid.startswith((entry + "::", entry + "["))
