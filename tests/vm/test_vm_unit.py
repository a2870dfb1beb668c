"""Fast checks of the harness's pure parts; no QEMU needed, so they run everywhere."""

from __future__ import annotations

import gzip
import io
import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from .vm import (
    EXIT_MARKER,
    SETUP_FAILED_MARKER,
    Assets,
    _bzimage_to_vmlinux,
    _Cpio,
    _init_script,
    _module_depends,
    _parse_serial,
    _run_sh,
    default_cache_dir,
    qemu_command,
)


def test_parse_serial_takes_the_marker_not_the_noise() -> None:
    log = f"[ 1.0] boot\r\nnoise\n{EXIT_MARKER}3\n[ 2.0] reboot: Restarting system\n"
    assert _parse_serial(log) == (3, None)
    assert _parse_serial(f"{SETUP_FAILED_MARKER} cannot mount\n") == (None, "cannot mount")
    assert _parse_serial("kernel panic, no marker") == (None, None)


def test_run_sh_quotes_env_args_and_cwd(tmp_path: Path) -> None:
    text = _run_sh("/r/.vm/script", ["a b", "$HOME"], {"X": "it's"}, "/some dir", "/r", shebang=False)
    script = tmp_path / "run.sh"
    # Run the generated wrapper on the host with a stub script to see the quoting hold.
    stub = tmp_path / "stub"
    stub.write_text('printf "%s|" "$X" "$@" "$(pwd)"\n')
    (tmp_path / "some dir").mkdir()
    text = text.replace("/r/.vm/script", str(stub)).replace("cd '/some dir'", f"cd '{tmp_path}/some dir'")
    script.write_text(text)
    out = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=True).stdout
    assert out == f"it's|a b|$HOME|{tmp_path}/some dir|"
    with pytest.raises(ValueError):
        _run_sh("/s", [], {"BAD-NAME": "1"}, "/", "/r", shebang=True)


def test_cpio_newc_unpacks_with_cpio_tool(tmp_path: Path) -> None:
    cpio = _Cpio()
    cpio.directory("bin")
    cpio.file("bin/hello", b"hi\n", 0o755)
    cpio.file("odd", b"12345")
    data = cpio.finish()
    assert len(data) % 512 == 0
    # Cross-check with an independent reader: GNU cpio, or the cached busybox's cpio applet.
    busybox = default_cache_dir() / "busybox" / "busybox"
    if shutil.which("cpio"):
        cmd = ["cpio", "-idm", "--quiet"]
    elif busybox.is_file():
        cmd = [str(busybox), "cpio", "-idm"]
    else:
        pytest.skip("no cpio tool (nor cached busybox) on this host to cross-check the archive")
    subprocess.run(cmd, input=data, cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "bin/hello").read_bytes() == b"hi\n"
    assert (tmp_path / "bin/hello").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "odd").read_bytes() == b"12345"


def test_module_depends_reads_modinfo() -> None:
    blob = b"\x7fELF junk\x00license=GPL\x00depends=virtio,virtio_ring\x00intree=Y\x00"
    assert _module_depends(blob) == ["virtio", "virtio_ring"]
    assert _module_depends(b"\x00depends=\x00") == []


def _fake_bzimage(payload: bytes) -> bytes:
    hdr = bytearray(1024)
    hdr[0x1F1] = 1  # one setup sector: protected-mode code starts at 1024
    hdr[0x202:0x206] = b"HdrS"
    hdr[0x248:0x24C] = (16).to_bytes(4, "little")
    hdr[0x24C:0x250] = len(payload).to_bytes(4, "little")
    return bytes(hdr) + b"\x00" * 16 + payload + b"tail"


def test_bzimage_payload_is_unpacked() -> None:
    elf = b"\x7fELF" + b"x" * 1000
    assert _bzimage_to_vmlinux(_fake_bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ))) == elf
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz:
        gz.write(elf)
    assert _bzimage_to_vmlinux(_fake_bzimage(buf.getvalue())) == elf
    assert _bzimage_to_vmlinux(_fake_bzimage(b"(zstd)")) is None
    assert _bzimage_to_vmlinux(b"not a kernel") is None


def test_qemu_command_is_tcg_and_cmdline_is_bounded(tmp_path: Path) -> None:
    assets = Assets(tmp_path, Path("/usr/bin/qemu"), Path("/k"), Path("/i"), "pkg", "rel", (), True)
    cmd = qemu_command(assets, Path("/var/cache/x"), Path("/var/cache/x/.vm/serial.log"))
    assert cmd[cmd.index("-accel") + 1] == "tcg"
    assert "-enable-kvm" not in cmd
    append = cmd[cmd.index("-append") + 1]
    assert len(append) < 2048 and '"' not in append and "ckpt_rw=/var/cache/x" in append
    with pytest.raises(ValueError):
        qemu_command(assets, Path("/has space"), Path("/s"))
    with pytest.raises(ValueError):
        qemu_command(assets, Path("/a,b"), Path("/s"))


def test_init_script_has_the_markers() -> None:
    text = _init_script(["virtio", "9p"])
    assert "for m in virtio 9p; do" in text
    assert EXIT_MARKER in text and SETUP_FAILED_MARKER in text
