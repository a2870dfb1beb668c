"""The main thread's credentials in two runs of injected code (blob.py), not ~14 single-stepped
syscalls: a migration's downtime paid one ptrace round trip (setregs, a step, a wait for the
helper to be scheduled, getregs) for each of PR_SET_KEEPCAPS, setresgid, setfsgid twice,
setresuid, setfsuid twice, capget, capset, the ambient clear, PR_GET_SECUREBITS, the last capset
and PR_SET_DUMPABLE.

The order is creds.py's (task.set_identity, creds.apply_security), cut where a later call needs
an earlier result: the first run changes the ids and reads the permitted set (capget) and the
securebits; the second sets the capabilities, bounding and ambient sets, securebits,
no_new_privs, the final capabilities and the dumpable flag. Both read nothing that the calls
between them in the one-by-one order could change (the bounding set is read from /proc before,
as apply_security does; setresuid does not touch the securebits, capset neither). Every call of a
run is made even after one failed, which is harmless: each failure ends the restore and kills the
helper, and the error names the first call of its run that failed, as the one-by-one path does.

Not used (`plan_calls` says None, the caller goes one by one): seccomp filters (each installed
with its suspension, creds.py) and a remote without a scratch area or with every real-time signal
blocked (blob.run falls back to single steps then anyway)."""

from __future__ import annotations

import struct

from ckpt import sysno as nr
from ckpt.errors import RestoreError
from ckpt.proc.task import read_security
from ckpt.ptrace.batch import Call, data_size
from ckpt.restore import blob
from ckpt.restore.creds import CAP_HDR_OFFSET, CAP_V3, NO_ID, check_security
from ckpt.restore.plan import RestorePlan
from ckpt.restore.remote import Remote

_CAPS = struct.Struct("<6I")
_M32 = 0xFFFFFFFF


def _caps(eff: int, prm: int, inh: int) -> bytes:
    lo, hi = (x & _M32 for x in (eff, prm, inh)), (x >> 32 & _M32 for x in (eff, prm, inh))
    return _CAPS.pack(*lo, *hi)


def _prctl(*args: int) -> tuple[int, ...]:
    return (*args, *([0] * (5 - len(args))))


def usable(remote: Remote, plan: RestorePlan) -> bool:
    sec = plan.task.security
    return bool(remote.scratch) and not (sec is not None and sec.filters)


def set_main_identity(remote: Remote, pid: int, plan: RestorePlan) -> None:
    """Credentials, capabilities, no_new_privs and the dumpable flag of the main thread, as
    task.set_thread_identity + PR_SET_DUMPABLE do them (the limits are set before, from outside)."""
    t, sec = plan.task, plan.task.security
    hdr = 0
    if sec is not None:
        # capget/capset take the header by a second pointer: it sits apart from the runs' own
        # area (results and buffers at the scratch's start, a few hundred bytes here).
        hdr = remote.put(struct.pack("<Ii", CAP_V3, 0), CAP_HDR_OFFSET)
    first: list[tuple[str, Call]] = []
    if sec is not None:
        first.append(("keeping capabilities across setresuid", Call(nr.PRCTL, _prctl(nr.PR_SET_KEEPCAPS, 1))))
    r, e, s, fsgid = t.gid
    first.append(("setting the group ids", Call(nr.SETRESGID, (r, e, s))))
    first.append(("setting the filesystem group id", Call(nr.SETFSGID, (fsgid,))))
    i_fsgid = len(first)
    first.append(("reading the filesystem group id", Call(nr.SETFSGID, (NO_ID,))))
    r, e, s, fsuid = t.uid
    first.append(("setting the user ids", Call(nr.SETRESUID, (r, e, s))))
    first.append(("setting the filesystem user id", Call(nr.SETFSUID, (fsuid,))))
    i_fsuid = len(first)
    first.append(("reading the filesystem user id", Call(nr.SETFSUID, (NO_ID,))))
    if sec is not None:
        i_capget = len(first)
        capget = Call(nr.CAPGET, (hdr, 0), out=24, out_arg=1, inp=bytes(24))
        first.append(("reading the capabilities", capget))
        first.append(("reading the securebits", Call(nr.PRCTL, _prctl(nr.PR_GET_SECUREBITS))))
    _fit(remote, [c for _, c in first], hdr)
    got = blob.run(remote, [c for _, c in first])
    # setfsuid/setfsgid return the previous id whatever happens: the calls that ask again say.
    for k, ((what, _), res) in enumerate(zip(first, got, strict=True)):
        if k in (i_fsgid - 1, i_fsuid - 1):
            continue
        if k in (i_fsgid, i_fsuid):
            want, kind = (fsgid, "group") if k == i_fsgid else (fsuid, "user")
            if res.ret != want:
                raise RestoreError(
                    f"cannot set the restored process's filesystem {kind} id to {want} (it is {res.ret})"
                )
            continue
        blob.check_ret(what, res.ret)
    second: list[tuple[str, Call]] = []
    if sec is not None:
        words = _CAPS.unpack(got[i_capget].data)
        prm = words[1] | words[4] << 32
        securebits = got[i_capget + 1].ret
        second.append(
            (
                "setting the inheritable capabilities",
                Call(nr.CAPSET, (hdr, 0), out_arg=1, inp=_caps(prm, prm, sec.cap_inh)),
            )
        )
        have_bnd = read_security(pid).cap_bnd
        for c in _bits(have_bnd & ~sec.cap_bnd):
            drop = Call(nr.PRCTL, _prctl(nr.PR_CAPBSET_DROP, c))
            second.append((f"dropping capability {c} from the bounding set", drop))
        second.append(
            (
                "clearing the ambient capabilities",
                Call(nr.PRCTL, _prctl(nr.PR_CAP_AMBIENT, nr.PR_CAP_AMBIENT_CLEAR_ALL)),
            )
        )
        for c in _bits(sec.cap_amb):
            second.append(
                (
                    f"raising ambient capability {c}",
                    Call(nr.PRCTL, _prctl(nr.PR_CAP_AMBIENT, nr.PR_CAP_AMBIENT_RAISE, c)),
                )
            )
        if securebits != sec.securebits:
            second.append(
                ("setting the securebits", Call(nr.PRCTL, _prctl(nr.PR_SET_SECUREBITS, sec.securebits)))
            )
        if sec.no_new_privs:
            second.append(("setting no_new_privs", Call(nr.PRCTL, _prctl(nr.PR_SET_NO_NEW_PRIVS, 1))))
        second.append(
            (
                "setting the capabilities",
                Call(nr.CAPSET, (hdr, 0), out_arg=1, inp=_caps(sec.cap_eff, sec.cap_prm, sec.cap_inh)),
            )
        )
    # A change of credentials makes the mm non-dumpable (fs.suid_dumpable): give back what it was.
    second.append(
        ("setting whether it is dumpable", Call(nr.PRCTL, _prctl(nr.PR_SET_DUMPABLE, int(t.dumpable))))
    )
    _fit(remote, [c for _, c in second], hdr)
    blob.check_all(remote, second)
    if sec is not None:
        check_security(pid, sec)


def _fit(remote: Remote, calls: list[Call], hdr: int) -> None:
    """The runs' area must end before the capability header (it does by far: ~20 calls)."""
    if hdr and remote.scratch + data_size(calls) > hdr:
        raise RestoreError("internal: the credentials' calls do not fit the restore's scratch area")


def _bits(mask: int) -> list[int]:
    return [c for c in range(64) if mask >> c & 1]
