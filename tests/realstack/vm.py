"""A throw-away QEMU virtual machine running the real Linux Bluetooth stack (the Debian
kernel's Bluetooth with ``hci_vhci`` virtual controllers, BlueZ's bluetoothd) on the
host's own root filesystem, for the ``realstack`` tests.

Why it is built this way (each point cost a failed run to learn):

- TCG, never KVM: ``/dev/kvm`` on these machines is nested and hangs the Debian kernel
  silently after "Probing EDD"; ``-cpu max``, since the default model makes numpy & co.
  die with "Illegal instruction"; ``-smp 1``, since with two CPUs btvirt's first
  controller failed to come up in 2 of ~10 runs.
- The host's ``/`` is shared read-only over virtio-9p (``multidevs=remap``: it spans
  several host file systems) so the VM runs exactly the host's bluez, dbus and the
  project's venv; the checkout is shared again at its own path (a clone under /tmp would
  be hidden by the guest's tmpfs there); a writable 9p share (the results folder) is mounted at the
  same path it has on the host.
- A tiny busybox initramfs loads the virtio/9p modules, mounts both shares and tmpfs on
  the few places that must be writable, and ``switch_root``s into the host's tree to run
  ``guest.sh``; ``cryptomgr.notests=1`` cuts ``modprobe bluetooth`` from 3.5 s to 0.4 s.
- A hard timeout on the whole VM.
"""

from __future__ import annotations

import glob
import io
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: the checkout the VM runs (its venv and the guest scripts)
PROJECT = HERE.parents[1]
#: the modules the initramfs loads, in dependency order (the rest comes from the host's /lib/modules)
INITRAMFS_MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
                     "netfs", "fscache", "9pnet", "9pnet_virtio", "9p")
PACKAGES = "qemu-system-x86 linux-image-amd64 bluez bluez-test-tools dbus busybox-static"

INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for m in /modules/*.ko; do /bin/busybox insmod "$m" || echo "realstack: insmod $m failed"; done
/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /newroot \\
  || { echo "realstack: cannot mount the host root"; /bin/busybox poweroff -f; }
for d in /run /tmp /var/lib/bluetooth /var/tmp; do /bin/busybox mount -t tmpfs tmpfs /newroot$d; done
# the project (its venv, guest.sh) again at its own path: a checkout under /tmp or /var/tmp
# would otherwise be hidden by the guest's tmpfs there
/bin/busybox mkdir -p /newroot{project} 2>/dev/null
/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 project /newroot{project}
/bin/busybox mkdir -p /newroot{results} 2>/dev/null  # under a tmpfs (/tmp) it must be made first
/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results /newroot{results}
/bin/busybox mount -t devtmpfs dev /newroot/dev
/bin/busybox umount /proc /sys
exec /bin/busybox switch_root /newroot /bin/sh {guest} {results}
"""


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An initramfs archive (cpio "newc"): (path, mode, data) entries."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        nb = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        out.write(b"070701" + b"".join(f"{f:08X}".encode() for f in fields) + nb)
        out.write(b"\0" * (-(110 + len(nb)) % 4) + data + b"\0" * (-len(data) % 4))
    return out.getvalue()


@dataclass(frozen=True)
class Kernel:
    vmlinuz: Path
    modules: Path


def find_kernel() -> Kernel | None:
    """The Debian kernel to boot (its version changes: found by glob), with its modules."""
    for vmlinuz in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        version = vmlinuz.split("vmlinuz-", 1)[1]
        modules = Path("/lib/modules") / version
        if (modules / "kernel/drivers/bluetooth/hci_vhci.ko").exists() or \
                list(modules.glob("kernel/drivers/bluetooth/hci_vhci.ko*")):
            return Kernel(Path(vmlinuz), modules)
    return None


def unavailable_reason() -> str | None:
    """Why the real stack cannot run here (None: it can)."""
    missing = [t for t in ("qemu-system-x86_64", "btvirt", "btmon", "busctl", "dbus-daemon") if not shutil.which(t)]
    if not Path("/usr/sbin/bluetoothd").exists() and not shutil.which("bluetoothd"):
        missing.append("bluetoothd")
    if not Path("/bin/busybox").exists() or _dynamic("/bin/busybox"):
        missing.append("busybox (static)")
    if missing:
        return f"the real-stack VM needs {', '.join(missing)} (apt-get install {PACKAGES})"
    if find_kernel() is None:
        return "no Debian kernel with hci_vhci under /boot and /lib/modules (apt-get install linux-image-amd64)"
    if not os.access(find_kernel().vmlinuz, os.R_OK):  # type: ignore[union-attr]
        return "the kernel image under /boot is not readable"
    return None


def _dynamic(path: str) -> bool:
    """Whether an ELF file has a program interpreter (is dynamically linked)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    return b"/lib64/ld-linux" in head or b"/lib/ld-linux" in head


def build_initramfs(kernel: Kernel, results: Path, guest: Path, dest: Path) -> None:
    entries: list[tuple[str, int, bytes]] = [(d, stat.S_IFDIR | 0o755, b"") for d in ("bin", "modules")]
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, Path("/bin/busybox").read_bytes()))
    for i, name in enumerate(INITRAMFS_MODULES):
        found = list(kernel.modules.glob(f"kernel/**/{name}.ko"))
        if found:  # built into this kernel otherwise
            entries.append((f"modules/{i:02d}-{name}.ko", stat.S_IFREG | 0o644, found[0].read_bytes()))
    init = INIT.replace("{results}", str(results)).replace("{guest}", str(guest)).replace("{project}", str(PROJECT))
    entries.append(("init", stat.S_IFREG | 0o755, init.encode()))
    dest.write_bytes(_cpio_newc(entries))


@dataclass
class VmRun:
    returncode: int
    console: str
    seconds: float
    timed_out: bool


def run_vm(guest: Path, results: Path, *, timeout_s: float, memory_mb: int = 1024,
           env: dict[str, str] | None = None,
           on_start: Callable[[subprocess.Popen[bytes]], None] | None = None) -> VmRun:
    """Boot the VM, run ``guest`` (a shell script, given the results folder) inside it,
    and return when it powers off or after ``timeout_s`` (killed). ``env``: variables for
    the guest (the kernel hands unknown ``NAME=value`` parameters to init's environment);
    ``on_start`` is given the QEMU process (to kill it from elsewhere)."""
    kernel = find_kernel()
    assert kernel is not None
    results.mkdir(parents=True, exist_ok=True)
    initrd = results / "initramfs.cpio"
    build_initramfs(kernel, results, guest, initrd)
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", str(memory_mb),
           "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
           "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
           "-append", " ".join(["console=ttyS0 panic=-1 quiet loglevel=3 cryptomgr.notests=1 rdinit=/init",
                                *(f"{k}={v}" for k, v in (env or {}).items())]),
           "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
           "-virtfs", f"local,path={PROJECT},mount_tag=project,security_model=none,readonly=on,multidevs=remap",
           "-virtfs", f"local,path={results},mount_tag=results,security_model=none,multidevs=remap"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if on_start is not None:
        on_start(proc)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        timed_out = True
    initrd.unlink(missing_ok=True)
    return VmRun(proc.returncode, out.decode(errors="replace"), time.monotonic() - t0, timed_out)
