"""What `ckpt diff` prints: a `git diff --stat`-like summary, the ranges, and hex diffs of one page.

The comparison itself is ckpt/diff.py; this module only turns a DiffResult into text.
"""

from __future__ import annotations

from typing import Any

from ckpt.diff import _ROW, ContentDiff, DiffResult, MappingDiff
from ckpt.image.format import PAGE_SIZE
from ckpt.ranges import runs

_BAR = 16  # widest stat bar, in characters


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _relation_text(d: DiffResult) -> str:
    return {
        "same": "the same layer",
        "ancestor": f"A is an ancestor of B (B is {d.dirty_layers} layer(s) above it)",
        "descendant": f"B is an ancestor of A (A is {d.dirty_layers} layer(s) above it)",
        "siblings": f"two chains with a common ancestor ({d.dirty_layers} layer(s) above it)",
        "unrelated": "unrelated chains (no dirty information between them)",
    }[d.relation]


def _bar(m: MappingDiff, scale: float) -> Any:
    from rich.text import Text

    t = Text()
    for n, ch, style in (
        (len(m.changed), "~", "yellow"),
        (len(m.added), "+", "green"),
        (len(m.removed), "-", "red"),
    ):
        if n:
            t.append(ch * max(1, round(n * scale)), style=style)
    return t


def _line_text(data: bytes, off: int, other: bytes | None, style: str) -> Any:
    from rich.text import Text

    t = Text()
    row = data[off : off + _ROW]
    for i, byte in enumerate(row):
        differs = other is not None and other[off + i] != byte
        t.append(f"{byte:02x}", style=style if differs else "")
        t.append(" ")
    t.append(" |" + "".join(chr(c) if 32 <= c < 127 else "." for c in row) + "|")
    return t


def _render_content(c: Any, cd: ContentDiff) -> None:
    def side(state: str | None, err: str | None) -> str:
        if err is None:
            return state or "?"
        return f"{state + ', ' if state else ''}not readable ({err})"

    a, b = side(cd.a_state, cd.a_error), side(cd.b_state, cd.b_error)
    c.print(f"\npage 0x{cd.addr:x}: A {a}, B {b}", end="")
    if cd.bytes_differ is None:
        c.print()
        return
    c.print(f"; {cd.bytes_differ} byte(s) differ")
    prev = None
    for off in cd.lines:
        if prev is not None and off != prev + _ROW:
            c.print("  ...")
        prev = off
        assert cd.a_bytes is not None and cd.b_bytes is not None
        if cd.line_diff(off):
            c.print(f"  +{off:04x} A ", _line_text(cd.a_bytes, off, cd.b_bytes, "bold red"), sep="")
            c.print(f"  +{off:04x} B ", _line_text(cd.b_bytes, off, cd.a_bytes, "bold green"), sep="")
        else:
            c.print(f"  +{off:04x}   ", _line_text(cd.a_bytes, off, None, ""), sep="")


def _name(m: MappingDiff) -> str:
    if not m.path:
        return "[anon]"
    return m.path.rsplit("/", 1)[-1] if m.path.startswith("/") else m.path


def _details(m: MappingDiff) -> str:
    """The second line of a mapping: what happened to its address range."""
    out = []
    if m.moved_pages_changed is not None:
        out.append(
            f"moved from {m.a[0][0]:012x}-{m.a[-1][1]:012x}, "
            f"{m.moved_pages_changed} page(s) differ from the old place"
        )
    out += [f"grown {s:012x}-{e:012x}" for s, e in m.grown]
    out += [f"shrunk {s:012x}-{e:012x}" for s, e in m.shrunk]
    out += [f"{pa}->{pb} {s:012x}-{e:012x}" for s, e, pa, pb in m.reprotected]
    if "removed" in m.changes and len(m.a) > 1:
        out.append(f"{len(m.a)} pieces")
    return "; ".join(out)


def render_diff(d: DiffResult, pages: bool = False) -> None:
    """The diff on stdout: a `git diff --stat`-like block per mapping, then threads, fds, mm fields;
    `pages` lists every range."""
    from rich.console import Console
    from rich.text import Text

    # Paths and names are printed as they are, never read as rich markup or emoji codes.
    c = Console(markup=False, emoji=False, highlight=False, soft_wrap=True)
    c.print(f"A {d.a}\nB {d.b}\n{_relation_text(d)}" + ("" if d.same_process else "; different processes"))
    if d.mappings:
        names = [_name(m) for m in d.mappings]
        wname = min(32, max(len(n) for n in names))
        totals = [len(m.changed) + len(m.added) + len(m.removed) + len(m.uncompared) for m in d.mappings]
        wnum = len(str(max(totals)))
        scale = min(1.0, _BAR / max(totals)) if max(totals) else 1.0
        for m, name, total in zip(d.mappings, names, totals, strict=True):
            s, e = m.span
            line = Text(
                f" {s:012x}-{e:012x} {m.perms} {name[:wname]:<{wname}} {', '.join(m.changes):<12}"
                f"| {total:>{wnum}} "
            )
            line.append_text(_bar(m, scale))
            c.print(line)
            if det := _details(m):
                c.print(f"     {det}")
    sm = d.summary()
    if d.empty:
        c.print("no differences")
    else:
        c.print(
            f" {len(d.mappings)} mapping(s) differ: {sm['pages_changed']} page(s) changed (~), "
            f"{sm['pages_added']} added (+), {sm['pages_removed']} removed (-)"
            + (f", {sm['pages_uncompared']} not comparable (?)" if sm["pages_uncompared"] else "")
            + f"; {_size(sm['bytes_changed'])} changed"
        )
    c.print(f" {sm['pages_dirty_unchanged']} page(s) written but unchanged; {sm['pages_compared']} compared")

    if pages:
        # Tens of thousands of lines: written as plain text in one go, not one rich print each.
        lines = [
            f"  {kind:<15} {s:012x}-{e:012x} {(e - s) // PAGE_SIZE:>8} page(s)\n"
            for kind, arr in (
                ("changed", d.changed),
                ("added", d.added),
                ("removed", d.removed),
                ("uncompared", d.uncompared),
                ("dirty-unchanged", d.dirty_unchanged),
            )
            for s, e in runs(arr).tolist()
        ]
        c.file.write("".join(lines))
        c.file.flush()
    elif len(d.changed) + len(d.added) + len(d.removed) + len(d.dirty_unchanged):
        c.print("(--pages lists every range)")

    for th in d.threads:
        regs = list(th.registers)
        regs += ["xsave"] if th.xsave else []
        regs += ["sigmask"] if th.sigmask else []
        regs += [f"state {th.state[0]}->{th.state[1]}"] if th.state else []
        c.print(f"thread {th.tid} {th.status}" + (f": {', '.join(regs)}" if regs else ""))
    for f in d.fds:
        if f.status == "moved":
            detail = f" (now fd {f.moved_to})"
        elif f.status == "changed" and f.a and f.b:
            detail = ": " + ", ".join(f"{k} {f.a[k]}->{f.b[k]}" for k in f.fields)
        else:
            detail = ""
        c.print(f"fd {f.fd} {f.status}{detail} {f.path}")
    for k, (x, y) in d.mm.items():
        if k in ("auxv", "cmdline", "environ"):
            c.print(f"mm.{k}: {x} -> {y} bytes")
        elif isinstance(x, int) and isinstance(y, int):
            c.print(f"mm.{k}: 0x{x:x} -> 0x{y:x}")
        else:
            c.print(f"mm.{k}: {x} -> {y}")
    if d.sigactions:
        c.print("signal actions differ: " + ", ".join(str(s) for s in d.sigactions))
    if d.content is not None:
        _render_content(c, d.content)
