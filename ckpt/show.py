"""What `ckpt show` and `ckpt read` print: tables of a layer, and hexdumps."""

from __future__ import annotations

import os
import signal
from bisect import bisect_left
from typing import Any

from ckpt.image import MergedView
from ckpt.proc.maps import PAGE_SIZE


def _vma_counts(view: MergedView) -> list[dict[str, Any]]:
    """Per mapping: pages present in the merged view, stored in this layer, zero in this layer."""
    top = view.layers[0]
    pg = top.meta.pages
    pt = view.page_table(small=True)  # a small chain's without numpy
    out = []
    for v in top.meta.vmas:
        a0, a1 = bisect_left(pg.data, v.start), bisect_left(pg.data, v.end)
        z0, z1 = bisect_left(pg.zero, v.start), bisect_left(pg.zero, v.end)
        out.append(
            {
                "start": v.start,
                "end": v.end,
                "perms": v.perms,
                "path": v.path,
                "status": v.status,
                "pages": v.npages,
                "present": pt.present_in(v.start, v.end),
                "stored": int(a1 - a0),
                "zero": int(z1 - z0),
            }
        )
    return out


def _task_dict(t: dict[str, Any]) -> dict[str, Any]:
    """The task record for JSON: siginfo bytes as hex."""
    t["pending"] = [
        {k: (v.hex() if isinstance(v, bytes | bytearray) else v) for k, v in p.items()} for p in t["pending"]
    ]
    sec = t.get("security")
    if sec and sec.get("filters"):
        sec["filters"] = [dict(f, prog=f["prog"].hex()) for f in sec["filters"]]
    return t


def show_dict(view: MergedView) -> dict[str, Any]:
    top = view.layers[0]
    m = top.meta
    size = os.path.getsize(top.path)
    return {
        "layer": str(top.path),
        "digest": top.digest,
        "chain": [str(layer.path) for layer in view.layers],
        "inventory": m.inventory.to_dict(),
        "vmas": _vma_counts(view),
        "threads": [
            {
                "tid": t.tid,
                "state": t.state,
                "rip": t.regs.get("rip", 0),
                "rsp": t.regs.get("rsp", 0),
                "orig_rax": t.regs.get("orig_rax", 0),
                "sigmask": t.sigmask,
                "xsave_bytes": len(t.xsave),
            }
            for t in m.threads
        ],
        "fds": [f.to_dict() for f in m.fds],
        "objects": [
            {**{k: v for k, v in o.to_dict().items() if k != "extents"}, "stored_bytes": o.stored_bytes}
            for o in m.objects
        ],
        "task": _task_dict(m.task.to_dict()),
        "mm": {k: v for k, v in m.mm.to_dict().items() if not isinstance(v, bytes | bytearray)},
        "sizes": {
            "file_bytes": size,
            "pages_stored": len(m.pages.data),
            "bytes_stored_raw": len(m.pages.data) * PAGE_SIZE,
            "compression_ratio": round(len(m.pages.data) * PAGE_SIZE / max(1, size), 3),
            "chunks": len(m.pages.chunks),
        },
        **({} if m.tree is None else {"tree": m.tree.to_dict()}),
        **({} if m.table is None else {"table": m.table.to_dict()}),
    }


def _table_text(tr: dict[str, Any] | None) -> str:
    """The table record (image/tablecache.py): what the next incremental dump may start from."""
    if tr is None:
        return "not recorded (an incremental on this layer reads the chain's tables)"
    return (
        f"kept beside the layer, if its sha256 {tr['sha256'][:16]}... matches: {tr['rows']} pages "
        f"of {tr['layers']} layer(s), root {tr['root']}"
    )


def render_show(view: MergedView) -> None:
    from rich.console import Console
    from rich.table import Table

    d = show_dict(view)
    inv = d["inventory"]
    # Every string here comes from the layer or the user (paths, comm): printed as it is, never
    # read as rich markup ('[/x]' in a path raised MarkupError) or emoji codes.
    c = Console(markup=False, emoji=False, highlight=False)
    t = Table(title=f"layer {d['layer']}", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    parent = inv["parent"]["path"] if inv["parent"] else "none (a full dump)"
    for k, v in (
        ("format", f"{inv['format']} version {inv['version']}"),
        ("digest", d["digest"]),
        ("process", f"pid {inv['pid']} ({inv['comm']}) {inv['exe']}"),
        ("start time", f"{inv['start_time']} ticks after boot {inv['boot_id'][:8]}"),
        ("kernel", f"{inv['kernel']} {inv['arch']}"),
        ("tracker", _tracker_text(inv)),
        ("parent", parent),
        ("chain", f"{len(d['chain'])} layer(s)"),
        ("page table", _table_text(d.get("table"))),
        (
            "copied",
            "frozen (a moment of the process)"
            if inv.get("consistent", True)
            else "while running (pre-dump, consistent: false): not restorable as a top",
        ),
    ):
        t.add_row(k, str(v))
    tk = d["task"]
    t.add_row(
        "credentials",
        f"uid {tk['uid'][1]} gid {tk['gid'][1]} (real/effective/saved/fs uid "
        f"{'/'.join(map(str, tk['uid']))}), groups {tk['groups'] or '-'}, umask {tk['umask']:04o}",
    )
    sec = tk.get("security")
    if sec is None:
        t.add_row("privileges", "not recorded (format 1 layer)")
    else:
        nf = "unreadable" if sec["filters"] is None else len(sec["filters"])
        mode = {0: "off", 1: "strict", 2: f"filters ({nf})"}.get(sec["seccomp_mode"], "?")
        t.add_row(
            "privileges",
            f"caps eff {sec['cap_eff']:#x} prm {sec['cap_prm']:#x} inh {sec['cap_inh']:#x} "
            f"bnd {sec['cap_bnd']:#x} amb {sec['cap_amb']:#x}, securebits {sec['securebits']:#x}, "
            f"no_new_privs {int(sec['no_new_privs'])}, seccomp {mode}",
        )
    if tk.get("stop"):  # a job-control stop (ckpt/jobstop.py)
        t.add_row("state", f"stopped ({signal.Signals(tk['stop']).name}): restored stopped")
    if tk["children"] or tk["pending"]:
        t.add_row(
            "children / pending", f"{tk['children'] or '-'} / {[p['sig'] for p in tk['pending']] or '-'}"
        )
    s = inv["stats"]
    for k in (
        "pages_total",
        "pages_dirty",
        "pages_dumped",
        "pages_zero",
        "pages_dirty_unchanged",
        "pages_dirty_huge",
        "freeze_ms",
        "elapsed_ms",
    ):
        if k in s:
            t.add_row(k, str(s[k]))
    z = d["sizes"]
    t.add_row(
        "size",
        f"{z['file_bytes'] / 1e6:.2f} MB file, {z['bytes_stored_raw'] / 1e6:.2f} MB of pages, "
        f"{z['compression_ratio']}x, {z['chunks']} chunks",
    )
    c.print(t)

    rows = [
        [
            f"{v['start']:012x}-{v['end']:012x}",
            v["perms"],
            str(v["pages"]),
            str(v["present"]),
            str(v["stored"]),
            str(v["zero"]),
            v["status"],
            v["path"],
        ]
        for v in d["vmas"]
    ]
    _table(c, "mappings", ("range", "perms", "pages", "present", "stored", "zero", "status", "path"), rows)

    tt = Table(title="threads")
    for col in ("tid", "state", "rip", "rsp", "in syscall", "sigmask"):
        tt.add_column(col)
    for th in d["threads"]:
        oa = th["orig_rax"]
        insys = "-" if oa >= 1 << 63 else str(oa)
        tt.add_row(
            str(th["tid"]), th["state"], f"{th['rip']:#x}", f"{th['rsp']:#x}", insys, f"{th['sigmask']:#x}"
        )
    c.print(tt)

    rows = [[str(f["fd"]), f["kind"], f"{f['flags']:#o}", str(f["pos"]), f["path"]] for f in d["fds"]]
    _table(c, "file descriptors", ("fd", "kind", "flags", "pos", "path"), rows)
    if d["objects"]:
        rows = [
            [
                o["kind"],
                o["name"] or str(o["ino"]),
                str(o["size"]),
                _stored(o),
            ]
            for o in d["objects"]
        ]
        _table(c, "shared objects (memfd, deleted files, SysV)", ("kind", "name", "size", "stored"), rows)
    if "tree" in d:
        rows = [
            [
                str(p["pid"]),
                str(p["ppid"]),
                str(p["pgid"]),
                str(p["sid"]),
                p["comm"],
                "this layer" if i == 0 else p["layer"] or f"zombie, status {p['exit_status']:#x}",
            ]
            for i, p in enumerate(d["tree"]["processes"])
        ]
        _table(c, "process tree", ("pid", "ppid", "pgid", "sid", "comm", "layer"), rows)


# rich lays a table out cell by cell (~1-2 ms a row here: 200k fds took minutes); past this many
# rows a table is printed as plain aligned columns, which costs one pass over the rows.
RICH_ROWS = 1000
_RIGHT = {"pages", "present", "stored", "zero"}


_CONTROL = {i: f"\\x{i:02x}" for i in [*range(0x20), 0x7F]}


def _stored(o: dict[str, Any]) -> str:
    if o.get("held_by"):  # a tree's shared object, stored once (ckpt/treeshare.py)
        return f"in pid {o['held_by']}'s layer"
    return str(o["stored_bytes"]) if o["stored"] else str(o["why"])


def _printable(s: str) -> str:
    """Control characters in a name escaped (rich strips them; the plain path must not pass an
    escape sequence from a layer to the terminal)."""
    return s.translate(_CONTROL)


def _table(c: Any, title: str, cols: tuple[str, ...], rows: list[list[str]]) -> None:
    if len(rows) <= RICH_ROWS:
        from rich.table import Table

        t = Table(title=title)
        for col in cols:
            t.add_column(col, justify="right" if col in _RIGHT else "left")
        for r in rows:
            t.add_row(*r)
        c.print(t)
        return
    widths = [max([len(col)] + [len(r[i]) for r in rows]) for i, col in enumerate(cols[:-1])]

    def line(r: list[str] | tuple[str, ...]) -> str:
        cells = [
            x.rjust(w) if col in _RIGHT else x.ljust(w) for x, w, col in zip(r, widths, cols, strict=False)
        ]
        return "  ".join([*cells, r[-1]])

    out = [f"{title} ({len(rows)})", line(cols)]
    out.extend(line([_printable(x) for x in r]) for r in rows)
    # Straight to the console's file: no layout, no markup, as the rows are (names are user strings).
    c.file.write("\n".join(out) + "\n")


def hexdump(data: bytes, base: int) -> str:
    lines = []
    for off in range(0, len(data), 16):
        row = data[off : off + 16]
        hx = " ".join(f"{b:02x}" for b in row)
        asc = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{base + off:016x}  {hx:<47}  |{asc}|")
    return "\n".join(lines) + "\n"


def _tracker_text(inv: dict[str, Any]) -> str:
    """The tracker, and the fd it holds in the target (uffd-wp's injected userfaultfd)."""
    name = inv["tracker"] or "none"
    state = inv.get("tracker_state")
    fd = state.get("fd") if isinstance(state, dict) else None
    if isinstance(fd, int) and not isinstance(fd, bool):
        return f"{name} (fd {fd} in the target)"
    return name
