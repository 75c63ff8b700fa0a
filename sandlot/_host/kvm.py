"""Can gVisor's KVM platform run here? /dev/kvm answering is not enough.

runsc's KVM platform runs the sentry as a guest kernel and needs hardware virtualisation (Intel VT-x
or AMD-V) behind /dev/kvm. A VM that exposes neither to its kernel can still offer /dev/kvm: a
paravirtual nested hypervisor (PVM, the ``kvm_pvm`` module) answers KVM's ioctls without VT-x, and runsc
then hangs at start. So: the CPU must show ``vmx`` or ``svm``, and KVM must not be PVM.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional

_KVM_GET_API_VERSION = 0xAE00
_SYS_MODULE = Path("/sys/module")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def api_version() -> int:
    """KVM_GET_API_VERSION of /dev/kvm; OSError when it is absent, closed to us, or does not answer."""
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    finally:
        os.close(fd)


def why_not_for_gvisor() -> Optional[str]:
    """None where /dev/kvm can carry runsc's KVM platform, else the reason it cannot."""
    try:
        version = api_version()
    except OSError as exc:
        return f"/dev/kvm is absent, closed or silent ({exc.strerror})"
    pvm = (_SYS_MODULE / "kvm_pvm").is_dir()
    hardware = (_SYS_MODULE / "kvm_intel").is_dir() or (_SYS_MODULE / "kvm_amd").is_dir()
    if pvm and not hardware:
        return (f"/dev/kvm (KVM API {version}) is PVM, a paravirtual nested hypervisor (module kvm_pvm), "
                f"not VT-x/AMD-V{_flags_note()}: runsc's KVM platform hangs on it")
    if not {"vmx", "svm"} & cpu_flags():
        return (f"/dev/kvm (KVM API {version}) answers, but the CPU has no vmx/svm flag (no VT-x/AMD-V for "
                "this kernel): runsc's KVM platform hangs on it")
    return None


def _flags_note() -> str:
    return "" if {"vmx", "svm"} & cpu_flags() else "; the CPU has no vmx/svm flag"
