"""Run a script inside a Debian kernel booted under QEMU, with this machine's ``/`` as its root.

Why this exists: the machine's own kernel is built without CONFIG_MEM_SOFT_DIRTY, so the
soft-dirty path of ckpt cannot be tested on it. Debian's stock kernel has soft-dirty. This module
fetches that kernel (``apt-get download`` + ``dpkg -x`` into a cache directory, never into
``/boot``), builds a tiny busybox initramfs, boots the kernel under QEMU with TCG, shares the
host's ``/`` read-only over 9p, chroots into it and runs one script there. A second, writable 9p
share carries the script, its output and its exit status back. See docs/vm.md.

Only the standard library is used, so any host Python (``/usr/bin/python3`` included) can drive
it; the guest itself runs whatever the chrooted host root offers.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CACHE_DIR = Path("/var/cache/ckpt-vm")
CACHE_ENV = "CKPT_VM_CACHE"

# Bumped when the layout of the cache changes in a way the manifest check cannot see.
ASSET_FORMAT = 3

# The modules the guest needs to mount 9p over virtio-pci, in a working load order (checked on
# Debian's 6.1 kernel). Their ``depends=`` fields are also followed, so a later Debian kernel
# that splits or merges modules still gets what it needs; names that are neither a file nor
# built in (fscache was folded into netfs in 6.12, for instance) are skipped.
MODULE_ORDER = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "9pnet",
    "9pnet_virtio",
    "netfs",
    "fscache",
    "9p",
)
# Loaded if present, not required: lets the guest's /tmp be an overlay of the host's /tmp (read
# through the root share) under a tmpfs, so host files under /tmp (a venv, a repo clone in CI,
# pytest's tmp_path) stay visible in the guest. Without it /tmp is a plain tmpfs.
OPTIONAL_MODULES = ("overlay",)

# Markers the guest prints on the serial console. QEMU exits 0 whatever happens inside, so the
# exit-status marker is the only trustworthy sign that the script ran to completion.
EXIT_MARKER = "CKPT_VM_EXIT_STATUS="
SETUP_FAILED_MARKER = "CKPT_VM_SETUP_FAILED:"
READY_MARKER = "CKPT_VM_GUEST_READY"

# The kernel command line is limited to 2048 bytes on x86 and cannot carry a `"`; anything
# bigger than a path goes through a file on the writable share instead.
CMDLINE_MAX = 2048

# Paths go onto the kernel command line and into QEMU's comma-separated -virtfs option, so keep
# them to characters that need no quoting in either place.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+@=-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Boot arguments. `quiet` keeps the 8250 UART (slow under TCG) from printing the whole boot log;
# `mitigations=off` because speculative-execution mitigations only cost time in an emulated CPU;
# `panic=-1` together with QEMU's -no-reboot turns any guest panic into a prompt QEMU exit.
# `no_timer_check`: at boot the kernel counts timer ticks over a busy-wait delay loop and panics
# ("IO-APIC + timer doesn't work!") when too few arrived; under TCG on a loaded host the vCPU is
# descheduled long enough for that (seen with 4 busy loops at nice -5 beside a run).
_BASE_CMDLINE = (
    "console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off nokaslr no_timer_check "
    "8250.nr_uarts=1 i8042.noaux i8042.nokbd random.trust_cpu=on rdinit=/init"
)

_SETUP_LOCK_TIMEOUT_S = 900.0
_APT_TIMEOUT_S = 900.0


class VmError(Exception):
    """Base class of every error this harness raises."""


class VmUnavailable(VmError):
    """QEMU, the kernel or the busybox binary cannot be had here; tests should skip, not fail."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GuestError(VmError):
    """The guest did not report an exit status: it failed to boot, to set up, or it timed out."""

    def __init__(self, message: str, *, serial_log: str = "", output: str = "") -> None:
        tail = "\n".join(serial_log.splitlines()[-40:])
        super().__init__(f"{message}\n--- serial log (tail) ---\n{tail}" if tail else message)
        self.serial_log = serial_log
        self.output = output


class GuestTimeout(GuestError):
    """The guest was still running when the time limit ran out; QEMU was killed."""


@dataclass(frozen=True)
class Assets:
    """Everything needed to boot the guest, all inside the cache directory except QEMU."""

    cache_dir: Path
    qemu: Path
    # What QEMU boots: the uncompressed ELF (PVH entry) when it could be had, else the bzImage.
    kernel: Path
    initramfs: Path
    kernel_package: str
    kernel_release: str
    modules: tuple[str, ...]
    # From the package's /boot/config-*: whether CONFIG_MEM_SOFT_DIRTY=y (None: no config seen).
    soft_dirty: bool | None


@dataclass(frozen=True)
class GuestResult:
    exit_status: int
    output: str
    serial_log: str
    share_rw: Path
    duration_s: float
    # False when the share was created by run_in_guest and removed after the run.
    share_kept: bool = True

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def check(self) -> GuestResult:
        """Raise GuestError unless the script exited 0 (for callers that want exceptions)."""
        if self.exit_status != 0:
            raise GuestError(
                f"guest script exited {self.exit_status}\n--- output ---\n{self.output}",
                serial_log=self.serial_log,
                output=self.output,
            )
        return self


@dataclass
class _Timer:
    """Collects named durations so --check and the docs can report where set-up time goes."""

    steps: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.steps[name] = self.steps.get(name, 0.0) + time.monotonic() - t0


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else DEFAULT_CACHE_DIR


# --------------------------------------------------------------------------------------------
# Set-up: packages, kernel, initramfs


def _run(
    cmd: Sequence[str], *, timeout_s: float, cwd: Path | None = None, what: str
) -> subprocess.CompletedProcess[str]:
    """Run a set-up command with a hard time limit; failures become VmUnavailable."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except FileNotFoundError as exc:
        raise VmUnavailable(f"{what}: {cmd[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise VmUnavailable(f"{what}: timed out after {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise VmUnavailable(f"{what}: `{' '.join(cmd)}` exited {proc.returncode}: {' | '.join(err)}")
    return proc


_APT_OPTS = ("-q", "-o", "DPkg::Lock::Timeout=300", "-o", "Acquire::Retries=3")


class _Apt:
    """apt-get/apt-cache with at most one `apt-get update` per set-up, and only when needed."""

    def __init__(self, timer: _Timer) -> None:
        self.updated = False
        self.timer = timer
        if shutil.which("apt-get") is None:
            raise VmUnavailable("apt-get not found: this harness needs a Debian-like host")

    def update(self) -> None:
        if self.updated:
            return
        if os.geteuid() != 0:
            raise VmUnavailable("apt-get update needs root (or pre-install the packages)")
        with self.timer.step("apt-get update"):
            _run(["apt-get", *_APT_OPTS, "update"], timeout_s=_APT_TIMEOUT_S, what="apt-get update")
        self.updated = True

    def kernel_package(self) -> str:
        """Name of the versioned image package the `linux-image-amd64` metapackage points to today."""
        for attempt in range(2):
            proc = subprocess.run(
                ["apt-cache", "depends", "linux-image-amd64"],
                capture_output=True,
                text=True,
                timeout=120,
                stdin=subprocess.DEVNULL,
            )
            names = re.findall(r"Depends:\s+(linux-image-\S+-amd64)\s*$", proc.stdout, re.M)
            if names:
                return names[0]
            if attempt == 0:
                # apt-cache knows nothing before the first `apt-get update` on a fresh machine.
                self.update()
        raise VmUnavailable("apt-cache cannot resolve linux-image-amd64 even after apt-get update")

    def install(self, *packages: str) -> None:
        if os.geteuid() != 0:
            raise VmUnavailable(f"{' '.join(packages)} missing and not root: cannot apt-get install")
        cmd = ["apt-get", *_APT_OPTS, "install", "-y", "--no-install-recommends", *packages]
        with self.timer.step("apt-get install"):
            try:
                _run(cmd, timeout_s=_APT_TIMEOUT_S, what="apt-get install")
            except VmUnavailable:
                if self.updated:
                    raise
                # Stale or missing package lists give 404s or "no installation candidate".
                self.update()
                _run(cmd, timeout_s=_APT_TIMEOUT_S, what="apt-get install")

    def download(self, package: str, dest: Path) -> Path:
        """`apt-get download` into dest; returns the .deb. Nothing is installed."""
        with self.timer.step(f"apt-get download {package}"):
            try:
                _run(
                    ["apt-get", *_APT_OPTS, "download", package],
                    timeout_s=_APT_TIMEOUT_S,
                    cwd=dest,
                    what=f"apt-get download {package}",
                )
            except VmUnavailable:
                if self.updated:
                    raise
                self.update()
                _run(
                    ["apt-get", *_APT_OPTS, "download", package],
                    timeout_s=_APT_TIMEOUT_S,
                    cwd=dest,
                    what=f"apt-get download {package}",
                )
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if not debs:
            raise VmUnavailable(f"apt-get download {package} left no .deb in {dest}")
        return debs[-1]


@contextlib.contextmanager
def _locked(cache_dir: Path, timeout_s: float = _SETUP_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive flock on CACHE/.lock, so concurrent test runs do not set up twice or half-read."""
    lock_path = cache_dir / ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise VmUnavailable(f"set-up lock {lock_path} held for over {timeout_s:.0f} s") from exc
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # closing the fd drops the flock


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Readers without the lock (the fast path) must never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _find_qemu(apt: _Apt | None) -> Path:
    found = shutil.which("qemu-system-x86_64")
    if found is None and apt is not None:
        apt.install("qemu-system-x86")
        found = shutil.which("qemu-system-x86_64")
    if found is None:
        raise VmUnavailable("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    return Path(found)


def _ensure_busybox(cache_dir: Path, apt: _Apt) -> Path:
    """A static busybox for the initramfs, taken from the busybox-static .deb.

    The package is extracted into the cache rather than installed: busybox-static conflicts with
    the dynamic `busybox` package that initramfs-tools pulls in, and the host does not need it.
    """
    target = cache_dir / "busybox" / "busybox"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".bb-") as tmp:
        deb = apt.download("busybox-static", Path(tmp))
        root = Path(tmp) / "root"
        _run(["dpkg-deb", "-x", str(deb), str(root)], timeout_s=300, what="dpkg -x busybox-static")
        candidates = [root / "bin" / "busybox", root / "usr" / "bin" / "busybox"]
        src = next((c for c in candidates if c.is_file()), None)
        if src is None:
            raise VmUnavailable("busybox-static package holds no bin/busybox")
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(target, src.read_bytes(), 0o755)
    return target


def _decompress_module(src: Path) -> bytes:
    """busybox insmod wants plain ELF; Debian ships .ko today but later kernels use .ko.xz/.zst."""
    data = src.read_bytes()
    name = src.name
    if name.endswith(".ko"):
        return data
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        try:
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
                return bytes(reader.read())
        except ImportError:
            zstd = shutil.which("zstd")
            if zstd is None:
                raise VmUnavailable(f"{name}: need the zstandard module or the zstd tool") from None
            return subprocess.run([zstd, "-dc", str(src)], check=True, capture_output=True, timeout=60).stdout
    raise VmUnavailable(f"unknown module compression: {name}")


def _module_name(path: Path) -> str:
    # Module names use `_`; file names may use `-` (the kernel treats them as the same).
    return path.name.split(".ko")[0].replace("-", "_")


def _module_depends(data: bytes) -> list[str]:
    """The `depends=` entry of a module's .modinfo section (NUL-separated key=value strings)."""
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", data)
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d]


def _bzimage_to_vmlinux(bz: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside a bzImage, or None if it cannot be had.

    Why: under TCG the guest spends ~2.3 s decompressing Debian's XZ-compressed bzImage, half
    of a whole run. Booting the ELF directly (QEMU's PVH entry, CONFIG_PVH=y) skips that.
    The payload's place is in the boot header: setup_sects at 0x1f1, payload_offset/length at
    0x248/0x24c, relative to the protected-mode code after the setup sectors.
    """
    if len(bz) < 0x250 or bz[0x202:0x206] != b"HdrS":
        return None
    setup_sects = bz[0x1F1] or 4
    start = (setup_sects + 1) * 512
    off = int.from_bytes(bz[0x248:0x24C], "little")
    length = int.from_bytes(bz[0x24C:0x250], "little")
    payload = bz[start + off : start + off + length]
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            elf = lzma.LZMADecompressor().decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            elf = gzip.GzipFile(fileobj=io.BytesIO(payload)).read()
        else:
            return None  # zstd/lz4/...: keep booting the bzImage
    except (lzma.LZMAError, OSError, EOFError):
        return None
    return elf if elf.startswith(b"\x7fELF") else None


def _extract_kernel(cache_dir: Path, package: str, apt: _Apt, timer: _Timer) -> dict[str, object]:
    """Download and unpack the kernel package; keep vmlinuz, its config and the needed modules.

    The unpacked package is ~400 MB; only a few MB are kept, in CACHE/kernel/RELEASE/.
    """
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".kernel-") as tmp:
        deb = apt.download(package, Path(tmp))
        root = Path(tmp) / "root"
        with timer.step("dpkg -x kernel"):
            _run(["dpkg", "-x", str(deb), str(root)], timeout_s=600, what=f"dpkg -x {deb.name}")
        mod_roots = [
            p
            for base in ("lib/modules", "usr/lib/modules")
            for p in (root / base).glob("*")
            if (p / "kernel").is_dir()
        ]
        if not mod_roots:
            raise VmUnavailable(f"{package}: no lib/modules/RELEASE/kernel inside")
        mod_root = mod_roots[0]
        release = mod_root.name
        vmlinuz = next(iter(sorted((root / "boot").glob("vmlinuz-*"))), None)
        if vmlinuz is None:
            raise VmUnavailable(f"{package}: no boot/vmlinuz-* inside")
        config = root / "boot" / f"config-{release}"

        builtin: set[str] = set()
        builtin_file = mod_root / "modules.builtin"
        if builtin_file.is_file():
            builtin = {
                _module_name(Path(line.strip()))
                for line in builtin_file.read_text().splitlines()
                if line.strip()
            }
        files = {_module_name(p): p for p in (mod_root / "kernel").rglob("*.ko*") if ".ko" in p.name}

        # Follow depends= from the wanted modules, then order: dependencies first, and otherwise
        # the order above (it is known to work).
        blobs: dict[str, bytes] = {}
        deps: dict[str, list[str]] = {}
        skipped_builtin: list[str] = []
        missing: list[str] = []
        todo = [*MODULE_ORDER, *OPTIONAL_MODULES]
        while todo:
            name = todo.pop(0)
            if name in blobs or name in skipped_builtin or name in missing:
                continue
            if name in files:
                blobs[name] = _decompress_module(files[name])
                deps[name] = _module_depends(blobs[name])
                todo.extend(deps[name])
            elif name in builtin:
                skipped_builtin.append(name)
            else:
                missing.append(name)
        rank = {n: i for i, n in enumerate((*MODULE_ORDER, *OPTIONAL_MODULES))}
        order: list[str] = []

        def visit(n: str, stack: tuple[str, ...] = ()) -> None:
            if n in order or n not in blobs or n in stack:
                return
            for d in sorted(deps[n], key=lambda x: rank.get(x, -1)):
                visit(d, (*stack, n))
            order.append(n)

        for n in sorted(blobs, key=lambda x: rank.get(x, -1)):
            visit(n)
        if "9p" not in order and "9p" not in skipped_builtin:
            raise VmUnavailable(f"{package}: no 9p module and 9p not built in")

        out = cache_dir / "kernel" / release
        mod_out = out / "modules"
        mod_out.mkdir(parents=True, exist_ok=True)
        for n in order:
            _atomic_write(mod_out / f"{n}.ko", blobs[n])
        bz = vmlinuz.read_bytes()
        _atomic_write(out / "vmlinuz", bz)
        soft_dirty: bool | None = None
        pvh = False
        if config.is_file():
            text = config.read_text(errors="replace")
            _atomic_write(out / "config", text.encode())
            soft_dirty = "\nCONFIG_MEM_SOFT_DIRTY=y\n" in f"\n{text}\n"
            pvh = "\nCONFIG_PVH=y\n" in f"\n{text}\n"
        boot = out / "vmlinuz"
        with timer.step("unpack vmlinux"):
            elf = _bzimage_to_vmlinux(bz) if pvh else None
        if elf is not None:
            boot = out / "vmlinux"
            _atomic_write(boot, elf)
        return {
            "kernel_package": package,
            "kernel_release": release,
            "kernel": str(boot),
            "kernel_bzimage": str(out / "vmlinuz"),
            "modules": order,
            "modules_builtin": skipped_builtin,
            "modules_missing": missing,
            "soft_dirty": soft_dirty,
        }


# PID 1 in the initramfs. It runs under busybox sh; `@MODULES@` is filled in at build time.
# Every failure path prints SETUP_FAILED on the console and reboots (= QEMU exit via -no-reboot).
_INIT_TEMPLATE = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
con=/dev/ttyS0
[ -c $con ] || con=/dev/console
fail() {
    echo "" > $con
    echo "@SETUP_FAILED@ $*" > $con
    sync
    reboot -f
    sleep 10
    exit 1
}
for m in @MODULES@; do
    insmod /modules/$m.ko 2>/tmp/insmod.err || echo "insmod $m: $(cat /tmp/insmod.err)" > $con
done
rw=
for arg in $(cat /proc/cmdline); do
    case $arg in ckpt_rw=*) rw=${arg#ckpt_rw=} ;; esac
done
[ -n "$rw" ] || fail "no ckpt_rw= on the kernel command line"
nr=/newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro hostroot $nr \
    || fail "cannot mount the host root over 9p"
mount -t proc proc $nr/proc || fail "mount /proc"
mount -t sysfs sysfs $nr/sys || fail "mount /sys"
mount -t devtmpfs devtmpfs $nr/dev || fail "mount /dev"
mkdir -p $nr/dev/pts $nr/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $nr/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $nr/dev/shm
# /tmp: host /tmp (lower, read-only over 9p) under a tmpfs (upper) if overlayfs is there and
# ckpt_tmp=tmpfs was not asked for; a plain tmpfs otherwise.
tmpmode=overlay
case " $(cat /proc/cmdline) " in *" ckpt_tmp=tmpfs "*) tmpmode=tmpfs ;; esac
if [ $tmpmode = overlay ]; then
    mkdir -p /ovl && mount -t tmpfs -o mode=755 tmpfs /ovl && mkdir -p /ovl/upper /ovl/work \
        && chmod 1777 /ovl/upper \
        && mount -t overlay -o lowerdir=$nr/tmp,upperdir=/ovl/upper,workdir=/ovl/work overlay $nr/tmp \
        || tmpmode=tmpfs
fi
if [ $tmpmode = tmpfs ]; then
    mount -t tmpfs -o mode=1777 tmpfs $nr/tmp || fail "mount /tmp"
fi
echo "ckpt-vm: /tmp is $tmpmode" > $con
mount -t tmpfs -o mode=755 tmpfs $nr/run || fail "mount /run"
# The writable share is mounted at its own host path, so paths mean the same on both sides.
# If that path lies under /tmp or /run it is created in the tmpfs just mounted there.
mkdir -p $nr$rw 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=mmap results $nr$rw \
    || fail "cannot mount the writable share at $rw"
[ -f $nr$rw/.vm/run.sh ] || fail "$rw/.vm/run.sh missing"
echo "@READY@" > $con
env -i /bin/chroot $nr /bin/sh $rw/.vm/run.sh > $nr$rw/.vm/output.log 2>&1 < /dev/null
rc=$?
echo $rc > $nr$rw/.vm/exit_status
sync
echo "" > $con
echo "@EXIT@$rc" > $con
umount $nr$rw 2>/dev/null
reboot -f
sleep 10
"""


def _init_script(modules: Sequence[str]) -> str:
    return (
        _INIT_TEMPLATE.replace("@MODULES@", " ".join(modules))
        .replace("@SETUP_FAILED@", SETUP_FAILED_MARKER)
        .replace("@READY@", READY_MARKER)
        .replace("@EXIT@", EXIT_MARKER)
    )


class _Cpio:
    """Minimal writer of the `newc` cpio format the kernel unpacks as initramfs (no cpio tool needed)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\x00"
        nlink = 2 if mode & 0o170000 == 0o040000 else 1
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self.buf.write(b"\x00" * (-(110 + len(encoded)) % 4))
        self.buf.write(data)
        self.buf.write(b"\x00" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.buf.write(b"\x00" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def _build_initramfs(busybox: Path, module_dir: Path, modules: Sequence[str]) -> bytes:
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "newroot", "modules"):
        cpio.directory(d)
    # The kernel opens /dev/console for PID 1 before anything is mounted: without this node
    # init would start with no stdout and no way to report on the serial line.
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", _init_script(modules).encode(), 0o755)
    for m in modules:
        cpio.file(f"modules/{m}.ko", (module_dir / f"{m}.ko").read_bytes())
    return cpio.finish()


def _initramfs_key(busybox: Path, modules: Sequence[str]) -> str:
    # Rebuild the initramfs (cheap) whenever init or its inputs change, without a new download.
    h = hashlib.sha256(_init_script(modules).encode())
    h.update(str(busybox.stat().st_size).encode())
    return h.hexdigest()[:16]


def _load_manifest(cache_dir: Path, qemu: Path | None) -> Assets | None:
    """The fast path: a complete, current cache needs no lock, no apt and no network."""
    try:
        m = json.loads((cache_dir / "assets.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        if m.get("format") != ASSET_FORMAT:
            return None
        busybox = Path(m["busybox"])
        modules = tuple(m["modules"])
        initramfs = Path(m["initramfs"])
        kernel = Path(m["kernel"])
        if not (busybox.is_file() and kernel.is_file() and initramfs.is_file()):
            return None
        if m.get("initramfs_key") != _initramfs_key(busybox, modules):
            return None
        if qemu is None:
            return None
        return Assets(
            cache_dir=cache_dir,
            qemu=qemu,
            kernel=kernel,
            initramfs=initramfs,
            kernel_package=m["kernel_package"],
            kernel_release=m["kernel_release"],
            modules=modules,
            soft_dirty=m.get("soft_dirty"),
        )
    except (KeyError, TypeError, OSError):
        return None


# The manifest entries that describe the extracted kernel (reused when the kernel is not refetched).
_KERNEL_KEYS = frozenset(
    (
        "kernel_package",
        "kernel_release",
        "kernel",
        "kernel_bzimage",
        "modules",
        "modules_builtin",
        "modules_missing",
        "soft_dirty",
    )
)


def ensure_assets(
    cache_dir: Path | None = None,
    *,
    install: bool = True,
    refresh: bool = False,
    timings: dict[str, float] | None = None,
) -> Assets:
    """Make sure QEMU, the kernel and the initramfs are there; idempotent and safe to run concurrently.

    cache_dir: defaults to $CKPT_VM_CACHE or /var/cache/ckpt-vm.
    install: allow `apt-get install qemu-system-x86` (root only). Without it a missing QEMU is
        VmUnavailable.
    refresh: ask apt again which kernel linux-image-amd64 points to, and fetch it if it changed.
        Without it a cached kernel is reused as is (no network once the cache is warm).
    timings: if given, filled with the duration of each set-up step.

    Raises VmUnavailable when anything cannot be had (no apt, not root, no network...).
    """
    cache_dir = (cache_dir or default_cache_dir()).absolute()
    qemu_now = shutil.which("qemu-system-x86_64")
    if not refresh:
        fast = _load_manifest(cache_dir, Path(qemu_now) if qemu_now else None)
        if fast is not None:
            return fast
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VmUnavailable(f"cannot create cache dir {cache_dir}: {exc} (set {CACHE_ENV})") from exc

    timer = _Timer()
    t0 = time.monotonic()
    with _locked(cache_dir):
        # Someone else may have finished the set-up while we waited for the lock.
        if not refresh:
            fast = _load_manifest(cache_dir, Path(qemu_now) if qemu_now else None)
            if fast is not None:
                return fast
        apt = _Apt(timer)
        qemu = _find_qemu(apt if install else None)
        busybox = _ensure_busybox(cache_dir, apt)

        old: dict[str, object] = {}
        with contextlib.suppress(OSError, ValueError):
            old = json.loads((cache_dir / "assets.json").read_text())
        kinfo: dict[str, object] | None = None
        if not refresh and old.get("format") == ASSET_FORMAT and Path(str(old.get("kernel"))).is_file():
            kinfo = {k: v for k, v in old.items() if k in _KERNEL_KEYS}
        if kinfo is None or refresh:
            with timer.step("resolve kernel package"):
                package = apt.kernel_package()
            if kinfo is None or kinfo.get("kernel_package") != package:
                kinfo = _extract_kernel(cache_dir, package, apt, timer)

        release = str(kinfo["kernel_release"])
        mod_list = kinfo["modules"]
        if not isinstance(mod_list, list):
            raise VmUnavailable(f"{cache_dir}/assets.json: bad module list; delete the cache")
        modules = tuple(str(m) for m in mod_list)
        with timer.step("build initramfs"):
            data = _build_initramfs(busybox, cache_dir / "kernel" / release / "modules", modules)
            initramfs = cache_dir / "kernel" / release / "initramfs.cpio"
            _atomic_write(initramfs, data)
        manifest = dict(
            kinfo,
            format=ASSET_FORMAT,
            busybox=str(busybox),
            initramfs=str(initramfs),
            initramfs_key=_initramfs_key(busybox, modules),
        )
        _atomic_write(cache_dir / "assets.json", json.dumps(manifest, indent=2).encode())
    timer.steps["total"] = time.monotonic() - t0
    if timings is not None:
        timings.update(timer.steps)
    result = _load_manifest(cache_dir, qemu)
    if result is None:
        raise VmUnavailable(f"set-up finished but {cache_dir}/assets.json does not check out")
    return result


# --------------------------------------------------------------------------------------------
# Running a guest


@contextlib.contextmanager
def host_scratch_dir(assets: Assets) -> Iterator[Path]:
    """A temporary host directory the guest sees (read-only) through the root share.

    Host /tmp is hidden in the guest by its own tmpfs, so files the guest should read (a binary
    compiled on the host, say) go here, under CACHE/scratch/, instead of under /tmp.
    """
    base = assets.cache_dir / "scratch"
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        yield Path(tmp)


def _check_safe_path(path: Path, what: str) -> str:
    s = str(path)
    if not _SAFE_PATH.match(s) or "//" in s:
        raise ValueError(f"{what} {s!r}: only [A-Za-z0-9._/+@=-] allowed (kernel cmdline / -virtfs)")
    return s


def _run_sh(
    script_file: str, args: Sequence[str], env: Mapping[str, str], cwd: str, results: str, shebang: bool
) -> str:
    """The wrapper the guest's init runs in the chroot: environment, working directory, then the script."""
    lines = [
        "# Generated by tests/vm/vm.py: runs inside the guest, chrooted into the host's root.",
        f"export PATH={shlex.quote(GUEST_PATH)}",
        "export HOME=/root LANG=C.UTF-8 TERM=dumb",
        f"export CKPT_VM=1 CKPT_VM_RESULTS={shlex.quote(results)}",
    ]
    for k, v in env.items():
        if not _ENV_NAME.match(k):
            raise ValueError(f"bad environment variable name {k!r}")
        lines.append(f"export {k}={shlex.quote(v)}")
    lines.append(f"cd {shlex.quote(cwd)} || exit 125")
    argv = " ".join(shlex.quote(a) for a in args)
    runner = shlex.quote(script_file) if shebang else f"/bin/sh {shlex.quote(script_file)}"
    lines.append(f"exec {runner} {argv}".rstrip())
    return "\n".join(lines) + "\n"


def _parse_serial(log: str) -> tuple[int | None, str | None]:
    status: int | None = None
    setup_failed: str | None = None
    for line in log.splitlines():
        line = line.strip().rstrip("\r")
        if line.startswith(EXIT_MARKER):
            with contextlib.suppress(ValueError):
                status = int(line[len(EXIT_MARKER) :].split()[0])
        elif line.startswith(SETUP_FAILED_MARKER):
            setup_failed = line[len(SETUP_FAILED_MARKER) :].strip()
    return status, setup_failed


def qemu_command(
    assets: Assets, share_rw: Path, serial_log: Path, *, memory_mb: int = 1024, host_tmp: bool = True
) -> list[str]:
    """The QEMU invocation (without the `timeout` wrapper); exposed for debugging by hand."""
    rw = _check_safe_path(share_rw, "share_rw")
    cmdline = f"{_BASE_CMDLINE} ckpt_rw={rw}" + ("" if host_tmp else " ckpt_tmp=tmpfs")
    if len(cmdline.encode()) >= CMDLINE_MAX or '"' in cmdline:
        raise ValueError(f"kernel command line too long or quoted ({len(cmdline)} bytes)")
    _check_safe_path(serial_log, "serial log")
    # fmt: off
    return [
        str(assets.qemu),
        # TCG, never KVM: /dev/kvm here belongs to a paravirtual hypervisor and -enable-kvm hangs.
        "-accel", "tcg",
        # `max` so host binaries built for x86-64-v2/v3 (numpy wheels, for one) run in the guest.
        "-cpu", "max",
        "-m", str(memory_mb),
        "-smp", "1",  # -smp 2 gave no speed-up under TCG here
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-monitor", "none",
        "-serial", f"file:{serial_log}",
        "-no-reboot",
        "-kernel", str(assets.kernel),
        "-initrd", str(assets.initramfs),
        "-append", cmdline,
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={rw},mount_tag=results,security_model=none",
    ]
    # fmt: on


def run_in_guest(
    script: str | Path,
    *,
    timeout_s: float = 120,
    share_rw: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    args: Sequence[str] = (),
    memory_mb: int = 1024,
    host_tmp: bool = True,
    assets: Assets | None = None,
    cache_dir: Path | None = None,
) -> GuestResult:
    """Boot the guest, run `script` there as root in the host's root (read-only), return its status.

    script: a Path is a file to run; a str is the script's text. It is copied to
        SHARE/.vm/script; it runs directly if it starts with `#!`, else with /bin/sh.
    timeout_s: bound on boot + script; on expiry QEMU is killed and GuestTimeout is raised.
    share_rw: writable directory shared with the guest, mounted in the guest at the same path
        (the script finds it in $CKPT_VM_RESULTS too). Defaults to a fresh directory under
        CACHE/runs/ that is removed after the run. Harness files go in SHARE/.vm/.
    env: extra environment for the script (on top of PATH, HOME, LANG, CKPT_VM=1, CKPT_VM_RESULTS).
    cwd: working directory in the guest (default: the share).
    args: arguments passed to the script.
    host_tmp: the guest's /tmp is the host's /tmp seen through a tmpfs overlay (host files
        visible, guest writes stay in the guest). False: an empty tmpfs.

    Raises VmUnavailable (no QEMU/kernel), GuestError (the guest never reported an exit status,
    e.g. it could not mount its root) or GuestTimeout. A script that fails is not an exception:
    look at GuestResult.exit_status, or call .check().
    """
    assets = assets or ensure_assets(cache_dir)
    own_share = share_rw is None
    if share_rw is None:
        runs = assets.cache_dir / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        share_rw = Path(tempfile.mkdtemp(dir=runs, prefix="run-"))
    share_rw = share_rw.absolute()
    share_rw.mkdir(parents=True, exist_ok=True)
    try:
        return _run_once(
            script,
            assets,
            share_rw,
            timeout_s=timeout_s,
            env=env or {},
            cwd=str(cwd) if cwd is not None else str(share_rw),
            args=args,
            memory_mb=memory_mb,
            host_tmp=host_tmp,
            own_share=own_share,
        )
    finally:
        if own_share and not os.environ.get("CKPT_VM_KEEP"):
            shutil.rmtree(share_rw, ignore_errors=True)


def _run_once(
    script: str | Path,
    assets: Assets,
    share_rw: Path,
    *,
    timeout_s: float,
    env: Mapping[str, str],
    cwd: str,
    args: Sequence[str],
    memory_mb: int,
    host_tmp: bool,
    own_share: bool,
) -> GuestResult:
    ctl = share_rw / ".vm"
    ctl.mkdir(exist_ok=True)
    for stale in ("output.log", "exit_status", "serial.log", "qemu.log"):
        (ctl / stale).unlink(missing_ok=True)
    body = script.read_bytes() if isinstance(script, Path) else script.encode()
    script_file = ctl / "script"
    script_file.write_bytes(body)
    script_file.chmod(0o755)
    run_sh = _run_sh(str(script_file), args, env, cwd, str(share_rw), body.startswith(b"#!"))
    (ctl / "run.sh").write_text(run_sh)

    serial = ctl / "serial.log"
    cmd = qemu_command(assets, share_rw, serial, memory_mb=memory_mb, host_tmp=host_tmp)
    # `timeout` bounds QEMU even if this Python process dies; subprocess's own timeout is a backstop.
    full = ["timeout", "--kill-after=5", f"{timeout_s:.0f}", *cmd]
    t0 = time.monotonic()
    timed_out = False
    with open(ctl / "qemu.log", "wb") as qlog:
        try:
            proc = subprocess.run(
                full, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT, timeout=timeout_s + 20
            )
            timed_out = proc.returncode in (124, 137)
        except subprocess.TimeoutExpired:
            timed_out = True
    duration = time.monotonic() - t0

    serial_text = serial.read_text(errors="replace") if serial.exists() else ""
    output_file = ctl / "output.log"
    output = output_file.read_text(errors="replace") if output_file.exists() else ""
    status, setup_failed = _parse_serial(serial_text)
    if status is not None:
        return GuestResult(
            exit_status=status,
            output=output,
            serial_log=serial_text,
            share_rw=share_rw,
            duration_s=duration,
            share_kept=not own_share,
        )
    qemu_log = (ctl / "qemu.log").read_text(errors="replace").strip()
    if timed_out:
        raise GuestTimeout(
            f"guest still running after {timeout_s:.0f} s; killed. Output so far:\n{output}",
            serial_log=serial_text,
            output=output,
        )
    if setup_failed:
        raise GuestError(f"guest set-up failed: {setup_failed}", serial_log=serial_text, output=output)
    hint = "" if serial_text.strip() else "; empty serial log: the kernel never ran (too little memory?)"
    raise GuestError(
        f"guest reported no exit status after {duration:.1f} s (QEMU: {qemu_log or 'no message'}){hint}",
        serial_log=serial_text,
        output=output,
    )


# --------------------------------------------------------------------------------------------
# CLI: python -m tests.vm.vm --check | python -m tests.vm.vm SCRIPT [ARGS...]

_CHECK_SCRIPT = r"""
echo "kernel: $(uname -r)"
echo "python: $(python3 -c 'import sys; print(sys.version.split()[0])' 2>&1)"
# Reading pagemap bits is beyond sh; this only shows clear_refs accepts 4. The real soft-dirty
# check is tests/vm/test_vm_smoke.py.
echo 4 > /proc/self/clear_refs && echo "clear_refs 4: accepted"
"""


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="run-in-guest", description="Run a script in the soft-dirty QEMU guest.")
    p.add_argument("--check", action="store_true", help="set up (if needed), boot once, print timings")
    p.add_argument("--cache", type=Path, default=None, help=f"default ${CACHE_ENV} or {DEFAULT_CACHE_DIR}")
    p.add_argument("--refresh", action="store_true", help="re-resolve linux-image-amd64 via apt")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for boot + script (default 120)")
    p.add_argument("--share-rw", type=Path, default=None, help="writable share (default: a temporary one)")
    p.add_argument("--cwd", default=None, help="working directory in the guest (default: the share)")
    p.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="environment variable (repeatable)"
    )
    p.add_argument("--serial", action="store_true", help="print the serial log too")
    p.add_argument("script", nargs="?", type=Path, help="script to run in the guest (#! or sh)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    ns = p.parse_args(argv)
    if not ns.check and ns.script is None:
        p.error("give a SCRIPT or --check")

    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        assets = ensure_assets(ns.cache, refresh=ns.refresh, timings=timings)
        setup_s = time.monotonic() - t0
        env = dict(kv.split("=", 1) for kv in ns.env)
        script: str | Path = _CHECK_SCRIPT if ns.check else ns.script
        res = run_in_guest(
            script,
            timeout_s=ns.timeout,
            share_rw=ns.share_rw,
            env=env,
            cwd=ns.cwd,
            args=ns.args,
            assets=assets,
        )
    except VmUnavailable as exc:
        print(f"run-in-guest: VM unavailable: {exc.reason}", file=sys.stderr)
        return 77
    except GuestError as exc:
        print(f"run-in-guest: {exc}", file=sys.stderr)
        return 70
    sys.stdout.write(res.output)
    if ns.serial:
        print("--- serial log ---\n" + res.serial_log)
    if ns.check:
        sd = {True: "y", False: "n", None: "?"}[assets.soft_dirty]
        print(f"kernel: {assets.kernel} from {assets.kernel_package}, CONFIG_MEM_SOFT_DIRTY={sd}")
        print(f"modules: {' '.join(assets.modules)}")
        note = "" if timings else " (no work here: cached, or done by another process)"
        print(f"set-up: {setup_s:.1f} s{note}")
        for k, v in timings.items():
            print(f"  {k}: {v:.1f} s")
        print(f"boot + script: {res.duration_s:.1f} s, exit status {res.exit_status}")
    return res.exit_status


if __name__ == "__main__":
    sys.exit(_main())
