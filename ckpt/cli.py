"""The `ckpt` command: argument parsing and output only; every command calls ckpt.api."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import functools
import gc
import io
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ckpt import __version__
from ckpt.errors import CkptError


def _ghost_limit(s: str) -> int:
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(s[-1:].lower(), 1)
    try:
        v = int(s[:-1] if mult > 1 else s, 0) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {s!r}") from None
    if not 0 <= v <= 1 << 40:
        raise argparse.ArgumentTypeError(f"out of range: {s!r}")
    return v


def _addr(s: str) -> int:
    try:
        v = int(s, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an address (hex 0x... or decimal)") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{s!r} is negative")
    return v


def _pid(s: str) -> int:
    try:
        v = int(s, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a process id") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} is not a process id")
    return v


# ckpt.image.writer's bounds, repeated so that parsing imports no zstd (a test keeps them equal).
LEVEL_MIN, LEVEL_MAX, DEFAULT_LEVEL = -(1 << 17), 22, -1
DEFAULT_OBJECT_LIMIT = 64 << 20  # ckpt.image.objects.DEFAULT_OBJECT_LIMIT, for the same reason


def _level(s: str) -> int:
    try:
        v = int(s, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a zstd level (an integer)") from None
    if not LEVEL_MIN <= v <= LEVEL_MAX:
        raise argparse.ArgumentTypeError(
            f"zstd level {v} is out of range ({LEVEL_MIN} .. {LEVEL_MAX}; negative is faster)"
        )
    return v


PIDNS_HELP = (
    "restore into a new pid namespace, where every process has its dumped pid (getpid, getppid, the "
    "pids a parent holds; for a process dumped inside a pid namespace, the pids it saw there); a small "
    "init is pid 1 there and exits with the root's status"
)
NEW_PIDS_HELP = (
    "a child of a tree whose pid is in use gets another (its parent's waitpid() or kill() of the old "
    "pid is then wrong; without this the restore refuses, naming who holds the pid)"
)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(s: str) -> int:
    """A byte count: 123, 512K, 256M, 2G (binary units; a trailing B or iB is allowed)."""
    t = s.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS else ""
    try:
        v = int(t[: len(t) - len(unit)], 10) * _SIZE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a size (e.g. 512M, 2G)") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} is not a positive size")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, like every other ckpt error (argparse would print the whole usage block).
        print(f"ckpt: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse makes a formatter for every add_argument (to check its metavar), and each asks
        # shutil for the terminal's width: shutil's import (bz2, lzma) and ~110 ioctls in every
        # command. The width is asked once, and only of os.
        return self.formatter_class(prog=self.prog, width=_help_width())  # type: ignore[call-arg]  # every HelpFormatter takes it


class _CommandParser(_Parser):
    """A command's parser that records its arguments and adds them only when it is used (parsing its
    arguments, printing its help or usage): a command runs one parser of the ~15, and adding the
    ~110 arguments of all of them was ~4% of a small dump's start. What it records is replayed in
    order, so the parser then is the one the calls would have built at once."""

    _later: list[tuple[int, str, tuple[Any, ...], dict[str, Any]]] | None = None  # None: completed

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # its own -h at once
        self._later = []
        self._groups = 0

    def _record(self, group: int, call: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if self._later is None:
            return False
        self._later.append((group, call, args, kwargs))
        return True

    def add_argument(self, *args: Any, **kwargs: Any) -> Any:
        if self._record(-1, "add_argument", args, kwargs):
            return None
        return super().add_argument(*args, **kwargs)

    def add_mutually_exclusive_group(self, **kwargs: Any) -> Any:
        if self._later is None:
            return super().add_mutually_exclusive_group(**kwargs)
        self._record(-1, "add_mutually_exclusive_group", (), kwargs)
        self._groups += 1
        return _LaterGroup(self, self._groups - 1)

    def set_defaults(self, **kwargs: Any) -> None:
        if not self._record(-1, "set_defaults", (), kwargs):
            super().set_defaults(**kwargs)

    def _complete(self) -> None:
        later, self._later = self._later, None
        groups: list[Any] = []
        for group, call, args, kwargs in later or ():
            if group >= 0:
                getattr(groups[group], call)(*args, **kwargs)
            elif call == "add_mutually_exclusive_group":
                groups.append(self.add_mutually_exclusive_group(**kwargs))
            else:
                getattr(self, call)(*args, **kwargs)

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        self._complete()
        return super().parse_known_args(*args, **kwargs)

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()

    def format_help(self) -> str:
        self._complete()
        return super().format_help()


class _LaterGroup:
    """A mutually exclusive group of a _CommandParser not yet completed: its calls are recorded too."""

    def __init__(self, parser: _CommandParser, index: int) -> None:
        self.parser, self.index = parser, index

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        self.parser._record(self.index, "add_argument", args, kwargs)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a command imports its ~100 modules: as the heap grows
    it would walk every object of every module several times and find no garbage (~18 M
    instructions, 3% of a small dump's start). On again for the command's own work."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # What the imports made stays for the whole command: kept out of the collections to come
        # (without this the first one after the pause walks all of it again: ~14 M more).
        gc.freeze()
        if was:
            gc.enable()


_WIDTH: list[int] = []


def _help_width() -> int:
    """shutil.get_terminal_size().columns - 2 (argparse's default), without importing shutil."""
    if not _WIDTH:
        try:
            cols = int(os.environ.get("COLUMNS", "0"))
        except ValueError:
            cols = 0
        if cols <= 0:
            try:
                cols = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
            except (AttributeError, ValueError, OSError):
                cols = 0
        _WIDTH.append((cols if cols > 0 else 80) - 2)
    return _WIDTH[0]


def _print_json(obj: Any) -> None:
    # One write per line (see restore/run.py): a restored process may share this stdout.
    sys.stdout.write(json.dumps(obj, indent=None, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, bytes):
        return o.hex()
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


class _LazyProgress:
    """A rich progress bar on stderr that appears only once a dump has taken a second
    (CKPT_PROGRESS_AFTER seconds: the tests set 0 to see it on any dump)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        try:
            self.after = float(os.environ.get("CKPT_PROGRESS_AFTER", "1.0"))
        except ValueError:
            self.after = 1.0
        self.bar: Any = None
        self.task: Any = None
        self.phase = ""

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.bar is None:
            if time.monotonic() - self.t0 < self.after:
                return
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task(phase, total=total or None)
        if phase != self.phase:
            self.phase = phase
            self.bar.update(self.task, description=f"ckpt: {phase}", total=total or None, completed=done)
        else:
            self.bar.update(self.task, completed=done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def cmd_check(a: argparse.Namespace) -> int:
    from ckpt.api import check

    rep = check()
    if a.json:
        _print_json(rep.to_dict())
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"kernel {rep.kernel}")
    t.add_column("feature")
    t.add_column("state")
    t.add_column("detail")
    for f in rep.features:
        t.add_row(f.name, "[green]yes[/]" if f.ok else "[red]no[/]", f.detail)
    c = Console()
    c.print(t)
    c.print(f"dirty tracker picked by --track auto: [bold]{rep.auto_tracker}[/]")
    return 0


def cmd_dump(a: argparse.Namespace) -> int:
    early = None
    if not (a.incremental or a.pre_dump):
        # Before the imports below (numpy, ckpt): the copy buffer is faulted in meanwhile. Through
        # `ckpt service` it is the service's warm one where it was lent to this command (warmbuf.py).
        from ckpt import warmbuf
        from ckpt.prefault import EarlyBuffer

        max_bytes = a.max_buffer or (2 << 30)
        early = warmbuf.for_pid(a.pid, max_bytes) or EarlyBuffer.for_pid(a.pid, max_bytes)
        _heap_for_one_dump()
    with _collector_paused():
        import ckpt.dump  # noqa: F401  # what api.dump imports, here with the collector paused
        from ckpt.api import dump
        from ckpt.image import find_layers

    if a.pre_dump and not a.incremental and a.parent is None:
        # CRIU's pre-dump: the first one is full (and arms tracking), the next ones incremental.
        a.incremental = bool(find_layers(Path(a.dir)))
    prog = _LazyProgress() if (sys.stderr.isatty() and not a.json) else None
    try:
        r = dump(
            a.pid,
            a.dir,
            incremental=a.incremental,
            track=a.track,
            parent=a.parent,
            leave_stopped=a.leave_stopped,
            kill=a.kill,
            force=a.force,
            final=a.final,
            pre_dump=a.pre_dump,
            fallback_full=a.fallback_full,
            precopy=a.pre_copy,
            level=a.level,
            progress=_test_hold(prog),
            ghost_limit=a.ghost_limit,
            early_buffer=early,
            **({"max_buffer": a.max_buffer} if a.max_buffer is not None else {}),
            tree=a.tree,
            **({"tcp_established": True} if a.tcp_established else {}),
        )
    finally:
        if prog:
            prog.close()
    for w in r.warnings:
        print(f"ckpt: warning: {w}", file=sys.stderr)
    if a.json:
        _print_json(r.to_dict())
        return 0
    kind = "incremental" if r.incremental else "full"
    ratio = r.bytes_raw / r.bytes_written if r.bytes_written else 0.0
    print(f"{r.layer}: {kind} dump of pid {r.pid} (tracker {r.tracker or 'none'})")
    print(
        f"  pages: {r.pages_total} present, {r.pages_dirty} dirty, {r.pages_dumped} stored, "
        f"{r.pages_zero} zero, "
        f"{r.pages_dirty_unchanged} dirty but unchanged"
        + (f" ({r.pages_dirty_huge} dirty in whole 2 MiB huge pages)" if r.pages_dirty_huge else "")
    )
    print(
        f"  {r.bytes_written / 1e6:.2f} MB written ({ratio:.1f}x compression); "
        f"frozen {r.freeze_ms:.1f} ms"
        + (f" ({r.held_ms:.1f} ms to the last thread let go)" if r.held_ms else "")
        + f", total {r.elapsed_ms:.1f} ms"
    )
    for m in r.tree:
        what = "zombie" if m["zombie"] else f"{m['layer']} ({m['pages_dumped']} pages stored)"
        print(f"  tree: pid {m['pid']} (parent {m['ppid']}): {what}")
    if r.restorable:
        print("  restorable: yes")
    else:
        print("  restorable: no")
        for why in r.not_restorable:
            print(f"    - {why}")
    return 0


def _heap_for_one_dump() -> None:
    """glibc's malloc for a process that makes one full dump and exits (this command's, in-process or
    the service's child; never a program that calls ckpt's API): blocks up to 32 MiB from the heap,
    kept there when freed. zstd's output buffer for each 1 MiB chunk (compressBound, ~1 MiB) was
    above glibc's dynamic mmap threshold, so every chunk's frame was a fresh mmap: ~85 first-touch
    faults a chunk on the compression threads, ~7 k per 256 MiB dump. Measured alternated (in-process,
    256 MiB, 8 runs each): faults 20.8 k -> 13.6 k, the compression threads' CPU 275 -> 231 ms."""
    import ctypes  # (already imported by prefault)

    with contextlib.suppress(OSError, AttributeError):  # (a C library without mallopt: as before)
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 512 << 20)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def _test_hold(prog: Callable[[str, int, int], None] | None) -> Callable[[str, int, int], None] | None:
    """Tests stop a `ckpt dump` at a phase to Ctrl-C it exactly there: CKPT_DUMP_TEST_HOLD=PHASE
    and CKPT_DUMP_TEST_HOLD_FD=FD (a pipe's write end the test passed down). At PHASE's first
    progress call in the main thread ("seize": the dump has begun, the freeze not yet) "PHASE\n"
    goes to FD and the dump waits for a signal: the test's SIGINT raises KeyboardInterrupt there.
    With CKPT_DUMP_TEST_HOLD_ANY_THREAD=1 the phase is held in whichever thread reaches it first:
    in the freezing thread ("copy": frozen, its injected calls done) only a SIGKILL ends the wait
    (signals are deferred there, and only the main thread can be woken by one).
    Off (one environment lookup) otherwise."""
    point = os.environ.get("CKPT_DUMP_TEST_HOLD")
    if not point:
        return prog
    held: list[bool] = []
    stops = {int(signal.SIGINT), int(signal.SIGTERM), int(signal.SIGHUP)}
    any_thread = os.environ.get("CKPT_DUMP_TEST_HOLD_ANY_THREAD") == "1"

    def hook(phase: str, done: int, total: int) -> None:
        import select
        import threading

        main = threading.current_thread() is threading.main_thread()
        if phase == point and not held and not main and any_thread:
            held.append(True)
            r, w = os.pipe2(os.O_CLOEXEC)  # (its write end kept: nothing but a SIGKILL ends this)
            with contextlib.suppress(KeyError, ValueError, OSError):
                os.write(int(os.environ["CKPT_DUMP_TEST_HOLD_FD"]), f"{point}\n".encode())
            select.select([r], [], [])
        if phase == point and not held and main:
            held.append(True)
            # Woken by the signal whichever thread of ckpt the kernel hands it to: Python's C
            # handler writes its number to the wakeup fd there, and the handler itself runs here,
            # once this returns (KeyboardInterrupt, or the dump's deferral of it). The fd is ours
            # from before the line goes out, so the test's signal cannot come unseen.
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            seen = b""
            try:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    os.write(int(os.environ["CKPT_DUMP_TEST_HOLD_FD"]), f"{point}\n".encode())
                while not stops & set(seen):
                    select.select([r], [], [])
                    seen += os.read(r, 64)
            finally:
                signal.set_wakeup_fd(old, warn_on_full_buffer=False)
                if old >= 0:
                    with contextlib.suppress(OSError):
                        os.write(old, seen)  # (what that fd's reader would have seen)
                os.close(r)
                os.close(w)
        if prog is not None:
            prog(phase, done, total)

    return hook


def cmd_untrack(a: argparse.Namespace) -> int:
    from ckpt.api import untrack

    fds = untrack(a.pid)
    if a.json:
        _print_json({"pid": a.pid, "closed_fds": fds})
    elif fds:
        print(
            f"removed ckpt's dirty tracking from pid {a.pid} (closed userfaultfd {', '.join(map(str, fds))})"
        )
    else:
        print(f"pid {a.pid} had no dirty tracking to remove")
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    from ckpt.api import open_layer
    from ckpt.show import render_show, show_dict

    view = open_layer(a.layer)
    if a.json:
        _print_json(show_dict(view))
    else:
        render_show(view)
    return 0


def cmd_read(a: argparse.Namespace) -> int:
    from ckpt.api import open_layer
    from ckpt.show import hexdump

    if a.size <= 0 or a.size > 1 << 32:
        raise CkptError(f"--size {a.size} is out of range (1 .. 4 GiB)")
    data = open_layer(a.layer).read(a.addr, a.size)
    if a.raw:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        sys.stdout.write(hexdump(data, a.addr))
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from ckpt.api import verify

    layers = verify(a.layer)
    for p in layers:
        print(f"{p}: ok")
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    from ckpt.api import merge

    out = merge(a.layer, a.output)
    print(out)
    return 0


def cmd_diff(a: argparse.Namespace) -> int:
    from ckpt.api import diff
    from ckpt.diffview import render_diff

    d = diff(a.a, a.b, force=a.force, content=a.content)
    if a.json:
        _print_json(d.to_dict())
    else:
        render_diff(d, pages=a.pages)
    return 0


def cmd_restore(a: argparse.Namespace) -> int:
    # Before the imports below: the layers are read into the page cache meanwhile (ckpt/readahead.py).
    from ckpt.readahead import Readahead

    ahead = Readahead.for_image(a.layer)
    try:
        return _restore(a)
    finally:
        if ahead is not None:
            ahead.stop()


def _restore(a: argparse.Namespace) -> int:
    with _collector_paused():
        import ckpt.restore.run  # noqa: F401  # what api.restore imports, here with the collector paused
        from ckpt.api import restore
        from ckpt.errors import RestoreError
        from ckpt.restore.pipes import parse_inherit

    try:
        inherit = parse_inherit(a.inherit_fd or [])
    except ValueError as e:
        raise RestoreError(str(e)) from None
    r = restore(
        a.layer, detach=a.detach, json_out=a.json, inherit_fds=inherit, pidns=a.pidns, new_pids=a.new_pids
    )
    return int(r) if isinstance(r, int) else 0


def _pidns_words(obj: dict[str, Any]) -> str:
    """serve's text line after a --pidns restore: its pid here is ckpt's (outer) number; the copy
    sees another inside its new namespace, whose init (pid 1 there) is the process to wait for."""
    init, inside = obj.get("init_pid"), obj.get("ns_pid")
    if not init:
        return ""
    if init == obj["pid"]:
        return f" outside, pid {inside} inside its new pid namespace: its init"
    return f" outside, pid {inside} inside its new pid namespace, whose init is pid {init} outside"


def cmd_serve(a: argparse.Namespace) -> int:
    from ckpt.migrate.server import serve
    from ckpt.migrate.tls import TlsOptions

    def emit(obj: dict[str, Any]) -> None:
        if a.json:
            _print_json(obj)
        elif "listening" in obj:
            print(f"listening on {obj['listening']}, storing into {obj['dir']}")
        elif obj.get("event") == "layer":
            print(f"  received {obj['layer']}{' (final)' if obj['final'] else ''}")
        elif obj.get("event") == "done":
            kept = "" if obj["pid_kept"] else f" (pid {obj['dumped_pid']} could not be kept)"
            print(f"restored as pid {obj['pid']}{kept}{_pidns_words(obj)}; layers in {obj['dir']}")
        sys.stdout.flush()

    def warn(msg: str) -> None:
        print(f"ckpt: {msg}", file=sys.stderr)

    # A supervisor's SIGTERM, a closed terminal's SIGHUP and a SIGQUIT are a Ctrl-C, as for
    # `ckpt migrate`: the layer being received is removed, a copy being built is killed (one held
    # in the final hand-over is decided first: the deferred signals of migrate/server.py), and the
    # source lets its original run on. (Their default action left the half-received layer.)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.default_int_handler)
    tls = TlsOptions(a.tls_cert, a.tls_key, a.tls_ca)
    serve(
        a.listen, a.dir, token_file=a.token_file, once=a.once, emit=emit, warn=warn, tls=tls, pidns=a.pidns,
        new_pids=a.new_pids,
    )  # fmt: skip
    return 0


def cmd_migrate(a: argparse.Namespace) -> int:
    from ckpt.migrate.source import MigrationFailed, migrate
    from ckpt.migrate.throttle import parse_rate
    from ckpt.migrate.tls import TlsOptions
    from ckpt.migrate.view import RoundTable

    if a.max_rounds is not None and a.max_rounds < 1:
        raise CkptError("--max-rounds must be at least 1")
    bw = parse_rate(a.bandwidth) if a.bandwidth else None
    if a.plot:
        from ckpt.teach.plot import check_target

        check_target(a.plot)  # before any freeze
    table = RoundTable() if (sys.stderr.isatty() and not a.json) else None

    def on_round(r: Any) -> None:
        if a.json:
            _print_json(r.to_dict())
            sys.stdout.flush()
        elif table:
            table.add(r)
        else:
            print(
                f"round {r.round} ({r.kind}): {r.pages_dirty} dirty, {r.pages_sent} sent, "
                f"{r.bytes_wire} B, {r.duration_ms:.1f} ms, freeze {r.freeze_ms:.1f} ms; {r.decision}"
            )

    # A supervisor's SIGTERM, a closed terminal's SIGHUP and a SIGQUIT are a Ctrl-C: the original
    # is let go, its throttle lifted and the staging chain removed.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.default_int_handler)
    try:
        res = migrate(
            a.pid,
            a.to,
            token_file=a.token_file,
            policy_name=a.policy,
            downtime_limit_ms=a.downtime_limit,
            max_rounds=a.max_rounds,
            bandwidth=bw,
            auto_converge=a.auto_converge,
            track=a.track,
            tls=TlsOptions(a.tls_cert, a.tls_key, a.tls_ca),
            on_round=on_round,
            tcp_established=bool(a.tcp_established),
            on_commit=a.on_commit,
            on_abort=a.on_abort,
        )
    except MigrationFailed as e:
        if a.json and e.reason:
            # An end object where a script must tell this failure from the others (a failure has had
            # none so far: scripts read "no end object, exit 1"), in the stderr line's words.
            _print_json({"source_pid": a.pid, "failed": e.reason, "error": _one_line(str(e))})
        raise
    finally:
        if table:
            table.close()
    for w in res.warnings:
        print(f"ckpt: warning: {w}", file=sys.stderr)
    if a.plot:
        from ckpt.teach.plot import plot_migration

        plot_migration(a.plot, res, a.policy, a.downtime_limit)
    if a.json:
        _print_json(res.to_dict())
        return 0
    where = "" if res.pid_kept else f" (pid {res.source_pid} could not be kept: in use)"
    print(
        f"migrated pid {res.source_pid} -> pid {res.pid}{where} in {res.rounds} live rounds + final; "
        f"stopped: {res.stop_reason}"
    )
    print(
        f"  downtime {res.downtime_ms:.1f} ms, total {res.total_ms:.0f} ms, {res.bytes_sent} bytes sent "
        f"({res.bytes_sent / max(res.memory_bytes, 1):.2f}x the memory)"
    )
    return 0


def cmd_service(a: argparse.Namespace) -> int:
    from ckpt.service import serve
    from ckpt.warmbuf import WarmStore

    if a.warm_buffer < 0 or a.warm_idle < 0:
        raise CkptError("--warm-buffer and --warm-idle cannot be negative")
    if a.rehearse < 0:
        raise CkptError("--rehearse cannot be negative")
    return serve(
        a.socket,
        as_json=a.json,
        warm=WarmStore(a.warm_buffer << 20, a.warm_idle),
        rehearsals=a.rehearse,
        spares=not a.no_spare,
    )


_PARSER: list[argparse.ArgumentParser] = []


def parser() -> argparse.ArgumentParser:
    """build_parser()'s parser, made once per process: a parse leaves it as it was (but for the
    command parsers it completes on first use, which then stay complete). A `ckpt service` parses
    each request to decide whether to serve it, and its child, forked after, parses the same
    arguments again with that parser: 1-4 ms of each served command were the two builds."""
    if not _PARSER:
        _PARSER.append(build_parser())
    return _PARSER[0]


def build_parser() -> argparse.ArgumentParser:
    # argparse asks gettext for each of its words as it makes a parser (~45 asks for ckpt's ~15),
    # and every ask looks for message catalogs on disk again (~180 stats, 1% of a small dump's
    # start); the answers cannot change while the parsers are made.
    words = argparse._  # type: ignore[attr-defined]
    argparse._ = functools.cache(words)  # type: ignore[attr-defined]
    try:
        return _build_parser()
    finally:
        argparse._ = words  # type: ignore[attr-defined]


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ckpt", description="Checkpoint/restore of Linux processes with incremental layers.")
    p.add_argument("--version", action="version", version=f"ckpt {__version__}")
    p.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_CommandParser)

    s = sub.add_parser("check", help="kernel features, and which dirty tracker auto picks")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_check)

    s = sub.add_parser("dump", help="add one layer for a live process to a directory")
    s.add_argument("--pid", "-t", type=_pid, required=True)
    s.add_argument("-D", "--dir", required=True, help="the dump directory (layers stack here)")
    s.add_argument(
        "--incremental", action="store_true", help="store only pages written since the newest layer"
    )
    s.add_argument("--parent", help="the parent layer (default: the newest in DIR)")
    s.add_argument(
        "--tree",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="dump the process with all its descendants (default: when it has children)",
    )
    s.add_argument("--track", default="auto", choices=["auto", "soft-dirty", "uffd-wp", "hash", "none"])
    g = s.add_mutually_exclusive_group()
    g.add_argument("--leave-stopped", action="store_true", help="leave the process stopped (SIGSTOP) after")
    g.add_argument("--kill", action="store_true", help="kill the process once the layer is safely written")
    s.add_argument(
        "--force", action="store_true", help="with --kill: kill it even if its layer could not be restored"
    )
    s.add_argument("--final", action="store_true", help="the last dump: remove the tracking from the process")
    s.add_argument(
        "--tcp-established",
        action="store_true",
        help="dump established TCP connections (TCP_REPAIR, CAP_NET_ADMIN; with --kill their packets are "
        "dropped until the restore)",
    )
    s.add_argument(
        "--pre-dump",
        action="store_true",
        help="copy the pages after the thaw, while the process runs (a layer marked consistent: false; "
        "incremental when DIR has layers)",
    )
    s.add_argument(
        "--fallback-full", action="store_true", help="make a full dump if an incremental one cannot be"
    )
    s.add_argument(
        "--pre-copy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="incremental with uffd-wp: copy the pages written since the parent while the process runs, "
        "then in the freeze only those written meanwhile (the layer is still the freeze's moment; "
        "default: when the estimate exceeds 1 MiB)",
    )
    s.add_argument(
        "--ghost-limit",
        type=_ghost_limit,
        default=DEFAULT_OBJECT_LIMIT,
        metavar="BYTES",
        help="most bytes of data stored for one memfd, deleted file or SysV segment; a larger one makes "
        f"the layer not restorable (default {DEFAULT_OBJECT_LIMIT >> 20} MiB; K, M, G suffixes)",
    )
    s.add_argument(
        "--level",
        type=_level,
        default=DEFAULT_LEVEL,
        help=f"zstd level, {LEVEL_MIN}..{LEVEL_MAX}; negative levels are faster (default {DEFAULT_LEVEL})",
    )
    s.add_argument(
        "--max-buffer",
        type=_size,
        metavar="SIZE",
        help="memory for pages copied while the process is frozen (default 2G); a dump with more "
        "compresses and writes while still frozen: less memory, a longer freeze",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_dump)

    s = sub.add_parser("untrack", help="remove ckpt's dirty tracking from a process")
    s.add_argument("--pid", "-t", type=_pid, required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_untrack)

    s = sub.add_parser("show", help="inventory, mappings, threads, fds of a layer")
    s.add_argument("layer")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_show)

    s = sub.add_parser("read", help="checkpointed memory at an address (merged view of the chain)")
    s.add_argument("layer")
    s.add_argument("--addr", type=_addr, required=True)
    s.add_argument("--size", type=_addr, required=True)
    s.add_argument("--raw", action="store_true", help="raw bytes on stdout instead of a hexdump")
    s.set_defaults(fn=cmd_read)

    s = sub.add_parser("verify", help="check every checksum of a layer and its parents")
    s.add_argument("layer")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("merge", help="write the merged view of a chain as one standalone layer")
    s.add_argument("layer")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(fn=cmd_merge)

    s = sub.add_parser("diff", help="what changed between two layers")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--json", action="store_true")
    s.add_argument("--pages", action="store_true", help="list every changed range")
    s.add_argument("--content", type=_addr, help="hex diff of the page at this address")
    s.add_argument("--force", action="store_true", help="compare layers of different processes")
    s.set_defaults(fn=cmd_diff)

    s = sub.add_parser("restore", help="bring the process of a layer back to life")
    s.add_argument("layer")
    s.add_argument("--detach", action="store_true", help="return once it runs, printing its pid")
    s.add_argument("--json", action="store_true")
    s.add_argument(
        "--inherit-fd",
        action="append",
        metavar="fd[N]:pipe:[INODE]",
        help="our fd N stands for the dumped pipe INODE, whose other end was outside the process",
    )
    s.add_argument("--pidns", action="store_true", help=PIDNS_HELP)
    s.add_argument("--new-pids", action="store_true", help=NEW_PIDS_HELP)
    s.set_defaults(fn=cmd_restore)

    s = sub.add_parser("serve", help="receive a live migration, store its layers, restore the process")
    s.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default 127.0.0.1, a free port)")
    s.add_argument("-D", "--dir", required=True, help="where the received layers go")
    s.add_argument("--token-file", help="the shared secret (mode 0600); needed beyond loopback")
    s.add_argument("--once", action="store_true", help="exit after one migration")
    s.add_argument("--tls-cert", help="TLS: this server's certificate (PEM); turns TLS on")
    s.add_argument("--tls-key", help="TLS: its private key (PEM), unless the certificate file holds it")
    s.add_argument("--tls-ca", help="TLS: require client certificates signed by this CA")
    s.add_argument("--json", action="store_true")
    s.add_argument("--pidns", action="store_true", help=PIDNS_HELP)
    s.add_argument("--new-pids", action="store_true", help=NEW_PIDS_HELP)
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("migrate", help="move a live process to a `ckpt serve`, copying while it runs")
    s.add_argument("--pid", "-t", type=_pid, required=True)
    s.add_argument("--to", required=True, help="HOST:PORT of the destination's ckpt serve")
    s.add_argument("--token-file", help="the shared secret (mode 0600)")
    s.add_argument("--policy", default="qemu", help="stop rule: qemu, xen, phaul or rounds:N (default qemu)")
    s.add_argument("--downtime-limit", type=float, default=300.0, metavar="MS", help="for qemu (default 300)")
    s.add_argument(
        "--max-rounds", type=int, help="stop the live rounds after N, whatever the rule says (default 30)"
    )
    s.add_argument("--bandwidth", help="limit the sender: RATE like 500KB/s, 12MB/s, 100Mbit")
    s.add_argument(
        "--auto-converge", action="store_true", help="throttle the process when it does not converge"
    )
    s.add_argument("--track", default="auto", choices=["auto", "soft-dirty", "uffd-wp", "hash"])
    s.add_argument(
        "--tcp-established",
        action="store_true",
        help="move established TCP connections (TCP_REPAIR, nftables lock; live during the rounds, "
        "handed over at the commit)",
    )
    s.add_argument(
        "--on-commit",
        metavar="CMD",
        help="with --tcp-established: a shell command run just before the commit, once the original "
        "has let go of its connections, to move their addresses to the destination (docs/restore.md)",
    )
    s.add_argument(
        "--on-abort", metavar="CMD", help="undoes --on-commit if the original takes its connections back"
    )
    s.add_argument("--tls-ca", help="TLS: verify the destination against this CA (PEM); turns TLS on")
    s.add_argument("--tls-cert", help="TLS: a client certificate, for a server that requires one")
    s.add_argument("--tls-key", help="TLS: its private key")
    s.add_argument("--json", action="store_true")
    s.add_argument("--plot", metavar="FILE", help="draw the rounds (.svg or .png; needs matplotlib)")
    s.set_defaults(fn=cmd_migrate)

    s = sub.add_parser("service", help="run ckpt commands from a resident process (CKPT_SERVICE=PATH)")
    s.add_argument("--socket", required=True, help="the socket's path; its directory is made 0700 if missing")
    s.add_argument("--json", action="store_true", help="one JSON line when listening and per request")
    s.add_argument(
        "--warm-buffer", type=int, default=1024, metavar="MIB",
        help="keep a full dump's copy buffer allocated for the next, up to MIB (0: never; default 1024)",
    )  # fmt: skip
    s.add_argument(
        "--warm-idle", type=float, default=300.0, metavar="SECONDS",
        help="free the warm copy buffer after SECONDS without a full dump (default 300)",
    )  # fmt: skip
    s.add_argument(
        "--rehearse", type=int, default=8, metavar="N",
        help="before listening, dump a helper process of its own N+1 times, so that served dumps run "
        "the freeze's code warm, and make a served dump's pages its own before its freeze "
        "(0: neither; default 8)",
    )  # fmt: skip
    s.add_argument(
        "--no-spare", action="store_true",
        help="fork each command's process when its request comes, not beforehand while idle",
    )  # fmt: skip
    s.set_defaults(fn=cmd_service)

    from ckpt.teach.commands import add_parsers as add_teach_parsers

    add_teach_parsers(sub, _pid)  # dirtyrate, simulate

    for cmd in sub.choices.values():
        # also after the command (`ckpt dump ... --debug`); SUPPRESS keeps a `ckpt --debug dump` intact
        cmd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _names_errors(e: UnicodeError) -> tuple[str | bytes, int]:
    """Encoding errors on our output: a file name that is not UTF-8 was decoded with
    surrogateescape, so its original bytes go out as they are (as `ls` prints them); any other
    unencodable character is printed as a backslash escape. Never a traceback."""
    assert isinstance(e, UnicodeEncodeError)
    bad = e.object[e.start : e.end]
    if all(0xDC80 <= ord(ch) <= 0xDCFF for ch in bad):
        return bytes(ord(ch) - 0xDC00 for ch in bad), e.end
    return codecs.backslashreplace_errors(e)


codecs.register_error("ckpt-names", _names_errors)


def _one_line(msg: str) -> str:
    """An error message is one line: control characters in names from a layer are escaped."""
    return "".join(f"\\x{ord(ch):02x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in msg)


def _tolerant_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="ckpt-names")


EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug of ckpt's, not of the input


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("CKPT_DEBUG", "") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    # ckpt uses no linear algebra; numpy's OpenBLAS would start a thread per CPU at import
    # (~30-50 ms of every command here). Set before any command imports numpy.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        # Before any thread starts (numpy's OpenBLAS starts one at import): then no thread of ckpt
        # takes the SIGCHLD that wakes a ptrace wait (ptrace/sigchld.py). Processes started from
        # here inherit the blocked mask (a restored process gets its own from the image).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            return _main(argv)
        finally:
            if signal.SIGCHLD not in old:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    except KeyboardInterrupt:
        # Ctrl-C as the arguments are parsed (the command's own are caught in _main): one line too,
        # wherever it lands (a service's command is started by a signal passed on at any moment).
        print("ckpt: interrupted", file=sys.stderr)
        return 130


def run() -> NoReturn:
    """The `ckpt` program run here (bin/ckpt, `python -m ckpt`): main(), then a quick exit."""
    _exit(main())


def _exit(code: int) -> NoReturn:
    # What is left once a command has returned is the interpreter's teardown: freeing ~400 modules
    # (numpy's among them) one by one, ~6% of the instructions of a small dump. A command has
    # flushed, closed and fsynced what it wrote by then; the teardown is skipped only when no other
    # thread runs (one would be cut short) and after the exit handlers ran, as at a normal exit.
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        raise SystemExit(code) from None  # e.g. a closed pipe: the ordinary exit reports it
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        raise SystemExit(code)
    import atexit

    atexit._run_exitfuncs()
    os._exit(code)


def _main(argv: Sequence[str] | None) -> int:
    _tolerant_output()
    args = parser().parse_args(argv)
    fn: Callable[[argparse.Namespace], int] = args.fn
    try:
        return fn(args)
    except CkptError as e:
        print(f"ckpt: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("ckpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `ckpt read --raw | head`: the reader left; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        # Anything else is a bug. The commands have already undone what they did to a target (every
        # dump path thaws on BaseException); the user gets one line, the traceback on request.
        if _debug(args):
            import traceback

            traceback.print_exc()
        msg = " ".join(str(e).split()) or "(no message)"
        print(
            f"ckpt: internal error: {type(e).__name__}: {msg}; please report "
            "(CKPT_DEBUG=1 or --debug shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
