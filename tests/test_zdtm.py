"""ckpt's zdtm-style corpus (tests/zdtm/*.c, run by tests/zdtm_run.py): small programs that each set
a kernel property up and check it themselves after a dump and a restore, as CRIU's zdtm suite does.

Per program and variant (`full`: one dump with --kill; `incr`: a full dump, a change, an incremental
dump with --kill, the chain restored): PASS, REFUSED (with one `ckpt: ...` line that names the
property), or WRONG (restored, but the program found itself different, or it crashed). WRONG is
never accepted; a refusal only where REFUSED lists it, with the words its message must contain, so
a regression either way shows. `none` (no ckpt at all) proves each program's own check.

The cycles run two at a time in one session fixture (each is ~0.5 s of ckpt per dump or restore,
mostly waiting on the kernel and python's start), then each test reads its outcome.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from tests.util import subreaper_on, subreaper_restore
from tests.zdtm_run import VARIANTS, Outcome, programs, run_all

# Refused, with the words the refusal must contain (why: the kind is not restored yet).
REFUSED: dict[str, str] = {
    "chroot00": "a changed root directory",
    "clonefiles00": "share one fd table (CLONE_FILES)",
    "deletedname00": "a working directory whose name ends in ' (deleted)'",
    "keyring00": "a process keyring",
    "link00": "other link(s)",
    "mntns00": "a mnt namespace of its own",
    "netns00": "a net namespace of its own",
    "uts00": "a uts namespace of its own",
    "mqueue00": "a POSIX message queue /zdtm-mq-",  # queues and their messages are not restored
    "pidfd00": "anon_inode:[pidfd]",  # pidfds are not restored
    "semundo00": "SysV semaphore undo (SEM_UNDO)",  # its adjustments cannot be read
    "unixlisten00": "(a socket)",  # unix sockets with a peer or a path outside: refused
}
# Restored wrong, known and not fixed yet: xfail(strict), so that a fix shows.
KNOWN_WRONG: dict[str, str] = {}

PROGRAMS = programs()
# By default `incr` (a full layer and an incremental one, the chain restored) and `none`: the whole
# corpus in ~3.5 min wall at load 12 on 2 CPUs. CKPT_ZDTM_ALL=1 adds `full` (a single full layer).
RUN_VARIANTS = VARIANTS if os.environ.get("CKPT_ZDTM_ALL") == "1" else ("incr",)
CASES = [(n, v) for n in PROGRAMS for v in RUN_VARIANTS]


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest) -> Iterator[dict[tuple[str, str], Outcome]]:
    """Every selected case run once (two at a time); the module is a subreaper meanwhile, so that
    the children of tree programs end as ours to reap, not init's."""
    wanted = set()
    for item in request.session.items:
        cs = getattr(item, "callspec", None)
        if cs is not None and item.module is request.module and "name" in cs.params:
            wanted.add((cs.params["name"], cs.params["variant"]))
    was_subreaper = subreaper_on()
    try:
        yield run_all(sorted(wanted))
    finally:
        subreaper_restore(was_subreaper)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass


def _params() -> list[object]:
    out: list[object] = []
    for n, v in CASES + [(n, "none") for n in PROGRAMS]:
        marks = []
        if n in KNOWN_WRONG and v != "none":
            marks.append(pytest.mark.xfail(reason=KNOWN_WRONG[n], strict=True))
        out.append(pytest.param(n, v, id=f"{n}-{v}", marks=marks))
    return out


@pytest.mark.parametrize(("name", "variant"), _params())
def test_zdtm(name: str, variant: str, outcomes: dict[tuple[str, str], Outcome]) -> None:
    o = outcomes[(name, variant)]
    assert o.verdict != "SETUP", f"{name} itself is broken: {o.detail}"
    assert o.verdict != "WRONG", f"{name} ({variant}) was restored wrong: {o.detail}"
    if name in REFUSED and variant != "none":
        assert o.verdict == "REFUSED", f"{name} ({variant}) was expected to be refused, got {o.verdict}"
        assert REFUSED[name] in o.detail, o.detail
    else:
        assert o.verdict == "PASS", f"{name} ({variant}): {o.verdict}: {o.detail}"
