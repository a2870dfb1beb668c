"""cli._CommandParser: a command's parser gets its arguments only when it is used (issue 9 part 3). It
must then be the parser the same calls would have built at once: the same help, usage, defaults and
answers for every command, and the same one-line errors."""

from __future__ import annotations

import argparse

import pytest

from ckpt import cli

ARGV = [
    ["dump", "--pid", "12", "-D", "d"],
    ["dump", "-t", "12", "-D", "d", "--incremental", "--kill", "--level", "-5", "--max-buffer", "64M"],
    ["dump", "--pid", "12", "-D", "d", "--no-tree", "--track", "none", "--leave-stopped", "--debug"],
    ["--debug", "restore", "l", "--detach", "--json", "--inherit-fd", "fd[3]:pipe:[77]", "--pidns"],
    ["show", "l", "--json"],
    ["read", "l", "--addr", "0x1000", "--size", "16", "--raw"],
    ["diff", "a", "b", "--pages", "--content", "0x2000"],
    ["migrate", "--pid", "3", "--to", "h:1", "--policy", "rounds:2", "--bandwidth", "1MB/s"],
    ["serve", "-D", "x", "--once"],
    ["simulate", "--memory", "64M", "--dirty-rate", "1MB/s", "--bandwidth", "10MB/s"],
    ["dirtyrate", "--pid", "4", "--interval", "100"],
    ["check"],
    ["untrack", "--pid", "9"],
    ["verify", "l"],
    ["merge", "l", "-o", "m"],
]
BAD = [
    ["dump", "--pid", "x", "-D", "d"],
    ["dump", "--pid", "1", "-D", "d", "--kill", "--leave-stopped"],
    ["dump", "--pid", "1"],
    ["simulate", "--bandwidth", "1"],
    ["restore"],
    ["nosuch"],
]


def _commands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _everything() -> tuple[dict[str, str], list[argparse.Namespace], list[str]]:
    p = cli.build_parser()
    helps = {name: c.format_help() + c.format_usage() for name, c in _commands(p).items()}
    helps[""] = p.format_help()
    parsed = [cli.build_parser().parse_args(argv) for argv in ARGV]
    return helps, parsed, _errors()


def _errors() -> list[str]:
    out = []
    for argv in BAD:
        with pytest.raises(SystemExit) as e:
            cli.build_parser().parse_args(argv)
        out.append(str(e.value.code))
    return out


def test_a_command_parser_is_completed_only_when_used() -> None:
    p = cli.build_parser()
    commands = _commands(p)
    assert all(c._later is not None for c in commands.values())  # type: ignore[attr-defined]
    p.parse_args(["dump", "--pid", "1", "-D", "d"])
    assert commands["dump"]._later is None  # type: ignore[attr-defined]
    assert all(c._later is not None for n, c in commands.items() if n != "dump")  # type: ignore[attr-defined]


def test_the_same_parsers_as_built_at_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    lazy = _everything()
    lazy_err = capsys.readouterr().err
    with monkeypatch.context() as m:
        m.setattr(cli._CommandParser, "__init__", argparse.ArgumentParser.__init__)
        m.setattr(cli._CommandParser, "_later", None)
        at_once = _everything()
        at_once_err = capsys.readouterr().err
    assert lazy == at_once
    assert lazy_err == at_once_err and lazy_err.count("\n") == len(BAD)
    assert all(line.startswith("ckpt: ") for line in lazy_err.splitlines())


def test_one_parser_parses_again_as_a_new_one(capsys: pytest.CaptureFixture[str]) -> None:
    """cli.parser(): one parser for every parse of a process (a service's requests, and its
    children's parse of the same arguments). Every command line, good and bad, interleaved and
    twice over, gives what a parser made for it alone gives."""
    fresh = [cli.build_parser().parse_args(argv) for argv in ARGV]
    _errors()
    want_err = capsys.readouterr().err
    one = cli.parser()
    for _ in range(2):
        for argv, bad, want in zip(ARGV, [*BAD, *BAD, *BAD], fresh, strict=False):
            assert one.parse_args(argv) == want
            with pytest.raises(SystemExit) as e:
                one.parse_args(bad)
            assert e.value.code == 2
    assert cli.parser() is one
    err = capsys.readouterr().err.splitlines()
    assert set(err) == set(want_err.splitlines())
