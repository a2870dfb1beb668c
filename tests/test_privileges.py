"""Privileges survive a checkpoint exactly, and never grow (issue 13, items 2, 3 and 10).

- Files a layer names (fds, mappings, exe, cwd) are opened with the rights of the process the layer
  describes, not with root's: by `ckpt restore` and by `ckpt read`.
- Capabilities (all five sets), securebits, no_new_privs and seccomp filters are dumped and given
  back; the restored process checks itself (tests/targets/privs.c).
- What cannot be given back is refused, by restore and already by dump (which then will not --kill).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckpt.errors import RestoreError, Unsupported
from ckpt.image import Layer, open_layer
from ckpt.image.format import SeccompFilter
from ckpt.restore import make_plan
from tests import test_restore
from tests.test_image import meta_dict, reassemble
from tests.test_restore import Restored, alive, dump, killed
from tests.util import Target, build_c, run_ckpt

restored = test_restore.restored  # the fixture: restores, and kills and reaps what it restored

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to be other users, to drop caps)")

_libc = ctypes.CDLL(None, use_errno=True)
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 24, 28, 47, 2
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 1 << 0, 1 << 1
SECBIT_NO_SETUID_FIXUP, SECBIT_NO_SETUID_FIXUP_LOCKED, SECBIT_KEEP_CAPS = 1 << 2, 1 << 3, 1 << 4
CAP_KILL, CAP_NET_BIND_SERVICE, CAP_SYS_MODULE, CAP_SYS_ADMIN = 5, 10, 16, 21
NR_GETPRIORITY, NR_ACCT = 140, 163
ENOTTY = 25
UID = 1001  # no passwd entry needed
STATUS_KEYS = ("Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp",
               "Seccomp_filters")  # fmt: skip


def _cap_last() -> int:
    return int(Path("/proc/sys/kernel/cap_last_cap").read_text())


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in lines) if k in STATUS_KEYS}


def _prctl(*args: int) -> None:
    if _libc.prctl(*(ctypes.c_ulong(a) for a in (*args, 0, 0, 0, 0)[:5])) != 0:
        raise OSError(ctypes.get_errno(), f"prctl{args}")


def _capset(eff: int, prm: int, inh: int) -> None:
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)(eff, prm, inh, 0, 0, 0)  # caps below 32 only
    if _libc.capset(hdr, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _root_without_caps() -> None:
    """preexec_fn: root, but NOROOT (locked) and an empty bounding set: after exec it has no
    capability at all, and no_new_privs is set by the target itself."""
    _prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED)
    for c in range(_cap_last() + 1):
        _prctl(PR_CAPBSET_DROP, c)


def _user_with_some_caps() -> None:
    """preexec_fn: uid 1001 keeping CAP_KILL and CAP_NET_BIND_SERVICE (inheritable), the latter
    ambient (so permitted and effective after exec); CAP_SYS_ADMIN and CAP_SYS_MODULE out of the
    bounding set; securebits NO_SETUID_FIXUP, locked."""
    _prctl(PR_SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP | SECBIT_NO_SETUID_FIXUP_LOCKED | SECBIT_KEEP_CAPS)
    for c in (CAP_SYS_MODULE, CAP_SYS_ADMIN):
        _prctl(PR_CAPBSET_DROP, c)
    os.setgroups([])
    os.setresgid(UID, UID, UID)
    os.setresuid(UID, UID, UID)
    both = 1 << CAP_KILL | 1 << CAP_NET_BIND_SERVICE
    _capset(both, both, both)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE)


def _as_user() -> None:
    os.setgroups([])
    os.setresgid(UID, UID, UID)
    os.setresuid(UID, UID, UID)


def rpid(r: Restored) -> int:
    """The restored privs process (Restored.pid looks for the rounds target): once it has answered,
    the one child of `ckpt restore` running privs."""
    exe = str(build_c("privs"))
    kids = Path(f"/proc/{r.proc.pid}/task/{r.proc.pid}/children").read_text().split()
    (pid,) = [int(k) for k in kids if os.readlink(f"/proc/{k}/exe") == exe]
    r._pid = pid  # so that Restored.close kills it
    return pid


def _no_helper_left(pid: int) -> None:
    """Nothing half-restored: the dumped pid is not alive and no restore helper is left among our
    children (the `restored` fixture makes this process the subreaper of what `ckpt restore`
    leaves). Other helpers' tests on this machine may have helpers of their own: not ours."""
    assert not alive(pid)
    for k in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split():
        with contextlib.suppress(OSError):
            assert "ckpt-restore-helper" not in os.readlink(f"/proc/{k}/exe"), k


def privs(spawn: Callable[..., Target], *args: str, **kw: object) -> Target:
    return spawn("privs", *args, stderr=subprocess.DEVNULL, **kw)


# -- item 3: capabilities, securebits, no_new_privs, seccomp ----------------------------------------
def test_root_without_caps_and_nnp_comes_back_so(tmp_path: Path, spawn: Callable[..., Target],
                                                  restored: Callable[..., Restored]) -> None:  # fmt: skip
    """A uid-0 process with every capability dropped and no_new_privs: before the fix it came back
    with all capabilities and without no_new_privs."""
    t = privs(spawn, "nnp", preexec_fn=_root_without_caps)
    want = _status(t.pid)
    assert want["CapEff"] == want["CapPrm"] == want["CapBnd"] == "0000000000000000", want
    assert want["Uid"].split()[0] == "0" and want["NoNewPrivs"] == "1"
    assert t.cmd("status") == f"nnp 1 secbits {SECBIT_NOROOT | SECBIT_NOROOT_LOCKED}"
    out = dump(t.pid, tmp_path / "d", "--kill")
    killed(t)
    assert out["restorable"] is True, out["not_restorable"]
    sec = Layer.open(tmp_path / "d" / "layer-0001.ckpt").task.security
    assert sec is not None and sec.cap_bnd == 0 and sec.no_new_privs and sec.securebits == 3
    r = restored(tmp_path / "d" / "layer-0001.ckpt")
    assert r.cmd("status") == f"nnp 1 secbits {SECBIT_NOROOT | SECBIT_NOROOT_LOCKED}"
    assert _status(rpid(r)) == want
    r.send("exit")
    assert r.wait() == 0


def test_user_with_some_caps_comes_back_so(tmp_path: Path, spawn: Callable[..., Target],
                                            restored: Callable[..., Restored]) -> None:  # fmt: skip
    t = privs(spawn, preexec_fn=_user_with_some_caps)
    want = _status(t.pid)
    assert want["CapInh"] == f"{1 << CAP_KILL | 1 << CAP_NET_BIND_SERVICE:016x}", want
    assert want["CapAmb"] == want["CapPrm"] == want["CapEff"] == f"{1 << CAP_NET_BIND_SERVICE:016x}", want
    assert not int(want["CapBnd"], 16) & (1 << CAP_SYS_ADMIN | 1 << CAP_SYS_MODULE)
    bits = SECBIT_NO_SETUID_FIXUP | SECBIT_NO_SETUID_FIXUP_LOCKED  # exec clears KEEP_CAPS
    assert t.cmd("status") == f"nnp 0 secbits {bits}"
    dump(t.pid, tmp_path / "d", "--kill")
    killed(t)
    r = restored(tmp_path / "d" / "layer-0001.ckpt")
    assert r.cmd("status") == f"nnp 0 secbits {bits}"
    assert _status(rpid(r)) == want
    r.send("exit")
    assert r.wait() == 0


def test_seccomp_filter_still_enforced_after_restore(tmp_path: Path, spawn: Callable[..., Target],
                                                      restored: Callable[..., Restored]) -> None:  # fmt: skip
    """getpriority fails with ENOTTY and acct kills the process, before and after the restore
    (before the fix the restored process was not filtered at all)."""
    t = privs(spawn, "seccomp")
    assert t.cmd(f"try {NR_GETPRIORITY}") == f"ret -1 errno {ENOTTY}"
    want = _status(t.pid)
    assert want["Seccomp"] == "2" and want["Seccomp_filters"] == "1"
    out = dump(t.pid, tmp_path / "d", "--kill")
    killed(t)
    assert out["restorable"] is True, out["not_restorable"]
    sec = Layer.open(tmp_path / "d" / "layer-0001.ckpt").task.security
    assert sec is not None and sec.seccomp_mode == 2 and sec.filters is not None and len(sec.filters) == 1
    assert len(sec.filters[0].prog) == 9 * 8
    shown = json.loads(run_ckpt("show", str(tmp_path / "d" / "layer-0001.ckpt"), "--json", check=True).stdout)
    assert shown["task"]["security"]["filters"] == [{"prog": sec.filters[0].prog.hex(), "flags": 0}]
    text = run_ckpt("show", str(tmp_path / "d" / "layer-0001.ckpt"), check=True).stdout
    assert "seccomp filters (1)" in " ".join(text.split()), text
    r = restored(tmp_path / "d" / "layer-0001.ckpt")
    assert r.cmd(f"try {NR_GETPRIORITY}") == f"ret -1 errno {ENOTTY}"
    assert _status(rpid(r)) == want
    r.send(f"try {NR_ACCT}")
    assert r.wait() == 128 + signal.SIGSYS


def test_user_notification_filter_is_refused_at_dump(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    t = privs(spawn, "notify")
    out = dump(t.pid, tmp_path / "d")
    assert out["restorable"] is False
    reasons = " | ".join(out["not_restorable"])  # type: ignore[arg-type]
    assert "seccomp filter 0 (of 1, oldest first) returns SECCOMP_RET_USER_NOTIF" in reasons, reasons
    r = run_ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "d"), "--kill")
    assert r.returncode == 1 and "not killing" in r.stderr and "SECCOMP_RET_USER_NOTIF" in r.stderr
    assert alive(t.pid) and t.cmd("status") == "nnp 0 secbits 0"


def test_strict_mode_target_survives_the_dump(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    """In SECCOMP_MODE_STRICT every syscall the dump injects would be fatal: they run with seccomp
    suspended, and the layer says why it cannot be restored."""
    t = privs(spawn, "strict")
    assert t.cmd("try 0") == "ret 0 errno 0"
    out = dump(t.pid, tmp_path / "d")
    assert out["restorable"] is False
    assert "unsupported: seccomp strict mode (SECCOMP_MODE_STRICT)" in out["not_restorable"]  # type: ignore[operator]
    assert t.cmd("try 0") == "ret 0 errno 0" and _status(t.pid)["Seccomp"] == "1"
    t.chan.send("exit")
    assert t.proc.wait(30) == 0


# -- item 2: files opened with the process's rights ---------------------------------------------------
def test_restore_opens_files_with_the_process_rights(
    tmp_path: Path, public_dir: Path, spawn: Callable[..., Target], restored: Callable[..., Restored]
) -> None:
    """A uid-1001 process's fd and mapping of a file it could read: once the file is root's alone,
    a restore by root refuses (naming it) instead of opening it with root's rights."""
    secret = public_dir / "secret.bin"
    secret.write_bytes(b"\x5e\xc2\xe7\x01" * 1024)
    secret.chmod(0o644)
    for arg, what in ((f"fd:{secret}", f"reopening fd 3 ({secret})"), (f"map:{secret}", f"{secret}")):
        t = privs(spawn, arg, preexec_fn=_as_user)
        d = tmp_path / arg[:3]
        dump(t.pid, d, "--kill")
        killed(t)
        secret.chmod(0o600)
        r = run_ckpt("restore", str(d / "layer-0001.ckpt"))
        assert r.returncode == 1 and what in r.stderr and "Permission denied" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        _no_helper_left(t.pid)
        secret.chmod(0o644)  # readable again: the same layer restores
        rp = restored(d / "layer-0001.ckpt")
        assert rp.cmd("read") == ("fd 5ec2e701 map 00000000" if arg[0] == "f" else "fd 00000000 map 5ec2e701")
        assert _status(rpid(rp))["Uid"] == f"{UID}\t{UID}\t{UID}\t{UID}"
        rp.send("exit")
        assert rp.wait() == 0


def _claim_uid(layer: Path, uid: int) -> None:
    """Rewrite the layer to claim another owner (checksums made right): what an attacker can do."""
    d = meta_dict(layer)
    d["task"]["uid"] = [uid] * 4
    d["task"]["gid"] = [uid] * 4
    d["task"]["groups"] = []
    for k in ("cap_inh", "cap_prm", "cap_eff", "cap_amb"):
        d["task"]["security"][k] = 0
    reassemble(layer, d)


def test_crafted_layer_gets_no_root_file(
    tmp_path: Path, public_dir: Path, spawn: Callable[..., Target]
) -> None:
    """A layer claiming uid 1001 whose fd 3 and mapping name a root-only file: before the fix the
    restored uid-1001 process could read the file, and `ckpt read` (run by root) showed its pages."""
    secret = public_dir / "secret.bin"
    secret.write_bytes(b"\x5e\xc2\xe7\x01" * 1024)
    secret.chmod(0o600)
    t = privs(spawn, f"fd:{secret}", f"map:{secret}")
    dump(t.pid, tmp_path / "d", "--kill")
    killed(t)
    layer = tmp_path / "d" / "layer-0001.ckpt"
    vma = next(v for v in Layer.open(layer).vmas if v.path == str(secret))
    got = run_ckpt("read", str(layer), "--addr", hex(vma.start), "--size", "4")
    assert got.returncode == 0, got
    assert "5e c2 e7 01" in got.stdout, got.stdout
    _claim_uid(layer, UID)
    r = run_ckpt("restore", str(layer))
    assert r.returncode == 1 and str(secret) in r.stderr and "Permission denied" in r.stderr, r.stderr
    _no_helper_left(t.pid)
    r = run_ckpt("read", str(layer), "--addr", hex(vma.start), "--size", "4")
    assert r.returncode == 1 and str(secret) in r.stderr and "Permission denied" in r.stderr, r.stderr
    assert f"uid {UID}" in r.stderr and "5e c2" not in r.stdout


# -- item 10: dump says whether its layer restores; --kill only what can come back ---------------------
def test_kill_refused_for_what_restore_refuses(tmp_path: Path, spawn: Callable[..., Target]) -> None:
    """A process restore would refuse (here: a descriptor of a deleted file whose bytes are above
    the dump's --ghost-limit) is not killed."""
    gone = tmp_path / "gone.bin"
    gone.write_bytes(b"x" * 4096)
    t = privs(spawn, f"fd:{gone}")
    gone.unlink()
    r = run_ckpt("dump", "--pid", str(t.pid), "-D", str(tmp_path / "d"), "--kill", "--ghost-limit", "0")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(
        f"ckpt: not killing pid {t.pid}: its layer could not be restored (unsupported: fd 3"
    )
    assert "--force" in r.stderr
    assert alive(t.pid) and t.cmd("status") == "nnp 0 secbits 0"
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").glob("layer-*"))
    d = str(tmp_path / "d")
    text = run_ckpt("dump", "--pid", str(t.pid), "-D", d, "--ghost-limit", "0", check=True).stdout
    assert "restorable: no\n    - unsupported: fd 3" in text, text
    out = dump(t.pid, tmp_path / "d", "--kill", "--force", "--ghost-limit", "0")
    killed(t)
    assert out["restorable"] is False and out["not_restorable"][0].startswith("unsupported: fd 3")  # type: ignore[index]


# -- the plan's refusals, on a real layer with its records changed ------------------------------------
def test_plan_refuses_what_it_cannot_give_back(tmp_path: Path, spawn: Callable[..., Target],
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    t = privs(spawn)
    dump(t.pid, tmp_path / "d")
    with open_layer(tmp_path / "d" / "layer-0001.ckpt") as v:
        task = v.top.meta.task
        sec = task.security
        assert sec is not None

        def refused(error: type[Exception], message: str, **change: Any) -> None:
            v.top.meta.task = dataclasses.replace(task, security=dataclasses.replace(sec, **change))
            with pytest.raises(error, match=message):
                make_plan(v)

        refused(Unsupported, r"seccomp strict mode \(SECCOMP_MODE_STRICT\)", seccomp_mode=1)
        refused(
            Unsupported, "seccomp filters that could not be read at dump time", seccomp_mode=2, filters=None
        )
        notif = SeccompFilter(struct.pack("<HBBI", 0x06, 0, 0, 0x7FC00000))  # ret USER_NOTIF
        refused(
            Unsupported, "seccomp filter 0 .* returns SECCOMP_RET_USER_NOTIF", seccomp_mode=2, filters=[notif]
        )
        ret_a = SeccompFilter(struct.pack("<HBBI", 0x16, 0, 0, 0))  # ret A
        refused(Unsupported, "a computed action", seccomp_mode=2, filters=[ret_a])
        allow = SeccompFilter(struct.pack("<HBBI", 0x06, 0, 0, 0x7FFF0000))
        refused(
            Unsupported, r"installed with flags 0x4", seccomp_mode=2, filters=[SeccompFilter(allow.prog, 4)]
        )
        refused(RestoreError, "capability sets are inconsistent", cap_eff=1, cap_prm=0)
        refused(RestoreError, "name capabilities this kernel lacks", cap_bnd=1 << 63)
        # More than ckpt itself has: never handed on.
        monkeypatch.setattr("ckpt.restore.plan._own_caps", lambda: (0, 0))
        refused(
            RestoreError,
            r"its permitted capabilities \(0x20\) include some ckpt lacks",
            cap_prm=32,
            cap_eff=0,
        )
        monkeypatch.setattr("ckpt.restore.plan._has_cap", lambda cap: False)
        no_caps = {k: 0 for k in ("cap_bnd", "cap_prm", "cap_eff", "cap_inh", "cap_amb")}
        refused(
            RestoreError, "seccomp filters needs CAP_SYS_ADMIN", seccomp_mode=2, filters=[allow], **no_caps
        )
        monkeypatch.undo()
        # A format 1 layer records none of this: refused for root, a warning for others.
        v.top.meta.task = dataclasses.replace(task, security=None)
        with pytest.raises(Unsupported, match="a root process in a format 1 layer"):
            make_plan(v)
        v.top.meta.task = dataclasses.replace(task, security=None, uid=(UID,) * 4, gid=(UID,) * 4)
        assert any("format 1" in w for w in make_plan(v).warnings)
        v.top.meta.task = task
        assert make_plan(v).task == task
