"""`sandlot doctor`: what this host supports, and a posture self-test from inside a real sandbox."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from typing import Optional

from . import _config
from ._host import cgroups

# Runs inside the sandbox (stdlib only) and prints one JSON object of raw facts.
POSTURE_PROBE = r'''
import ctypes, json, os, resource
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
def ns(name):
    try:
        return os.readlink("/proc/self/ns/" + name)
    except OSError:  # gVisor has no cgroup namespace to show
        return None
def ro(path):
    try:
        open(path, "w").close()
        return False
    except OSError as e:
        return e.errno in (13, 30)
facts = {
    # PR_GET_NO_NEW_PRIVS: gVisor's /proc/self/status has no NoNewPrivs line.
    "seccomp": status["Seccomp"].strip(), "no_new_privs": str(ctypes.CDLL(None).prctl(39, 0, 0, 0, 0)),
    "cap_eff": status["CapEff"].strip(), "cap_prm": status["CapPrm"].strip(), "cap_bnd": status["CapBnd"].strip(),
    "uid": os.getuid(), "gid": os.getgid(), "kernel_release": os.uname().release,
    "uid_map": open("/proc/self/uid_map").read().split(),
    "ns": {n: ns(n) for n in ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")},
    "root_readonly": ro("/should-not-exist") and ro("/usr/should-not-exist"),
    "interfaces": sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]),
    "pids_visible": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "rlimit_core": resource.getrlimit(resource.RLIMIT_CORE)[1],
    "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    "rlimit_nproc": resource.getrlimit(resource.RLIMIT_NPROC)[1],
    "sid": os.getsid(0),
    "home_writable": os.access(os.path.expanduser("~"), os.W_OK),
    "secrets_visible": [p for p in ("/etc/shadow", "/etc/gshadow", "/etc/ssh", "/root/.ssh", "/root/.bash_history",
                                    "/run/sandlot", "/var/lib", "/home/user/.ssh") if os.path.exists(p)],
}
print(json.dumps(facts))
'''


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def host_checks() -> list[Check]:
    checks = []
    max_ns = _read_int("/proc/sys/user/max_user_namespaces")
    userns_ok = os.path.exists("/proc/self/ns/user") and (max_ns or 0) > 0
    detail = f"max_user_namespaces={max_ns}"
    if os.geteuid() != 0:
        clone = _read_int("/proc/sys/kernel/unprivileged_userns_clone")
        apparmor = _read_int("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
        if clone == 0:
            userns_ok, detail = False, "kernel.unprivileged_userns_clone=0: unprivileged user namespaces are off"
        elif apparmor == 1:
            userns_ok, detail = False, ("kernel.apparmor_restrict_unprivileged_userns=1: AppArmor blocks "
                                        "unprivileged user namespaces (run as root, or allow them)")
    checks.append(Check("user namespaces", userns_ok, detail))
    actions = _read("/proc/sys/kernel/seccomp/actions_avail")
    checks.append(Check("seccomp filters", "errno" in (actions or ""), actions or "missing"))
    from ._host import seccomp

    try:
        seccomp.compiled_filter()
        checks.append(Check("libseccomp", True, "compiles the allowlist"))
    except Exception as exc:  # noqa: BLE001 - the doctor reports, it does not crash
        checks.append(Check("libseccomp", False, f"{type(exc).__name__}: {exc}"))
    from ._agent import landlock

    abi = landlock.abi_version()
    checks.append(Check("Landlock", abi > 0, f"ABI {abi}" if abi else "not available (a second fence only)", False))
    info = cgroups.detect()
    version = f"v{info['version']}" if info["version"] else "none"
    detail = f"{version}, controllers: {', '.join(info['controllers']) or '-'}"
    if info["why"]:
        detail += f" — {info['why']}"
    checks.append(Check("cgroups", info["writable"], detail))
    charged, why = cgroups.socket_memory_charged()
    checks.append(Check("socket buffers", charged, why, False))
    runsc = shutil.which("runsc")
    runsc_detail = "missing (install Debian's runsc for isolation='gvisor')"
    if runsc:
        out = subprocess.run([runsc, "--version"], capture_output=True, text=True, timeout=10).stdout
        runsc_detail = f"{runsc}: {out.splitlines()[0] if out else '?'}"
    checks.append(Check("gVisor runsc", bool(runsc), runsc_detail, False))
    checks.append(_kvm_check())
    checks.append(_ksm_check())
    checks += _storage_checks()
    checks.append(_durable_check())
    return checks


def _ksm_check() -> Check:
    """Memory merging of sandboxes (KSM): whether the kernel offers it, whether ksmd runs, whether asked."""
    from ._host import ksm

    st = ksm.status()
    if not st.available:
        return Check("memory merging (KSM)", False, st.why, False)
    try:
        asked = "on for sandboxes (SANDLOT_KSM=1)" if _config.ksm() else "off for sandboxes (SANDLOT_KSM=1 or serve --ksm)"
    except Exception as exc:  # noqa: BLE001 - a bad SANDLOT_KSM is reported, as the first sandbox would
        return Check("memory merging (KSM)", False, str(exc), False)
    if st.running:
        daemon = (f"ksmd runs: {st.pages_to_scan} pages every {st.sleep_millisecs} ms, "
                  f"{st.pages_sharing} pages shared, {(st.general_profit or 0) / 2**20:.1f} MB saved")
    else:
        daemon = "ksmd off"
    return Check("memory merging (KSM)", True, f"available; {asked}; {daemon}", False)


def _durable_check() -> Check:
    """A server's sandboxes outlive it only if the next server can take their channels (pidfd_getfd, which
    Yama's ptrace_scope 3 forbids even to root): tried on a child of ours."""
    import socket

    from ._host import pidfds

    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # holds its end until we took a copy (or a few seconds passed)
        ours.close()
        theirs.settimeout(5)
        try:
            theirs.recv(1)
        finally:
            os._exit(0)
    try:
        pidfd = os.pidfd_open(pid)
        try:
            taken = pidfds.take_socket(pidfd, theirs.fileno(), 1.0)
        finally:
            os.close(pidfd)
        ok = taken is not None
        if taken is not None:
            taken.close()
        detail = ("a restarted server takes its sandboxes back (pidfd_getfd)" if ok else
                  "pidfd_getfd refused (Yama ptrace_scope 3?): a server's sandboxes end with it")
    except OSError as exc:
        ok, detail = False, f"pidfd_getfd: {exc}: a server's sandboxes end with it"
    finally:
        ours.send(b"x")
        ours.close()
        theirs.close()
        os.waitpid(pid, 0)
    return Check("durable sessions", ok, detail, False)


def _storage_checks() -> list[Check]:
    """Host directories (id-mapped mounts, tried on the data directory's file system) and volumes (loop
    devices, mkfs.ext4)."""
    import tempfile

    from ._storage import idmap

    try:
        _config.data_dir().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=_config.data_dir()) as probe:
            fd = os.open(probe, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.close(idmap.detached_copy(fd, readonly=False, owner=(0, 0), user=1000))
            finally:
                os.close(fd)
        grants = Check("id-mapped mounts", True, "writable host directories get their owner's files")
    except Exception as exc:
        grants = Check("id-mapped mounts", False, f"{exc} (read-only host directories still work, unmapped)", False)
    tools = [t for t in ("mkfs.ext4", "debugfs", "mount") if not shutil.which(t)]
    loop = os.path.exists("/dev/loop-control")
    volumes_ok = os.geteuid() == 0 and loop and not tools
    detail = ("ext4 images on loop devices" if volumes_ok else
              "needs root, /dev/loop-control and mkfs.ext4, debugfs, mount (e2fsprogs, util-linux): missing "
              + ", ".join(([] if os.geteuid() == 0 else ["root"]) + ([] if loop else ["/dev/loop-control"]) + tools))
    return [grants, Check("volumes", volumes_ok, detail, False)]


def _kvm_check() -> Check:
    """/dev/kvm may answer without carrying runsc's KVM platform (PVM, no VT-x/AMD-V): say which, and why."""
    from ._host import kvm

    platform = _config.gvisor_platform()
    why = kvm.why_not_for_gvisor()
    if why is not None:
        return Check("/dev/kvm", False, f"not usable: {why}; gVisor uses {platform}", False)
    return Check("/dev/kvm", True, f"KVM API {kvm.api_version()} with VT-x/AMD-V; gVisor uses {platform} "
                 "(SANDLOT_GVISOR_PLATFORM=kvm to use it: check that `runsc --platform=kvm do true` returns)", False)


def posture_checks(facts: dict, host_ns: Optional[dict] = None, isolation: str = "process") -> list[Check]:
    host_ns = host_ns or {n: os.readlink(f"/proc/self/ns/{n}") for n in facts["ns"]}
    same = [n for n, v in facts["ns"].items() if host_ns.get(n) == v]
    if isolation == "gvisor":
        # gVisor's uid map is its own kernel's; what matters is that the code talks to that kernel.
        release = facts.get("kernel_release")
        boundary = Check("gVisor kernel", release != os.uname().release,
                         f"the code's kernel reports {release!r} (the host's is {os.uname().release!r})")
    else:
        uid_map = facts["uid_map"]
        # The map is relative to the parent user namespace: it must never reach that namespace's root.
        rows = [uid_map[i:i + 3] for i in range(0, len(uid_map), 3)]
        unprivileged = bool(rows) and all(int(outside) != 0 for _, outside, _ in rows)
        boundary = Check("unprivileged uid map", unprivileged, " ".join(uid_map))
    return [
        Check("seccomp filter", facts["seccomp"] == "2", f"Seccomp: {facts['seccomp']}"),
        Check("no_new_privs", facts["no_new_privs"] == "1", f"NoNewPrivs: {facts['no_new_privs']}"),
        Check("no capabilities", int(facts["cap_eff"], 16) == 0 and int(facts["cap_bnd"], 16) == 0,
              f"CapEff {facts['cap_eff']}, CapBnd {facts['cap_bnd']}"),
        Check("own namespaces", not same, "all differ from the host's" if not same else f"shared: {same}"),
        Check("non-root user", facts["uid"] != 0, f"uid {facts['uid']}"),
        boundary,
        Check("read-only root", facts["root_readonly"], "/ and /usr refuse writes"),
        Check("network", facts["interfaces"] == ["lo"], f"interfaces: {facts['interfaces']}"),
        Check("host processes hidden", max(facts["pids_visible"]) < 100, f"{len(facts['pids_visible'])} pids visible"),
        Check("no core dumps", facts["rlimit_core"] == 0, f"RLIMIT_CORE {facts['rlimit_core']}"),
        Check("own session", facts["sid"] == 1, f"session {facts['sid']} (led by the sandbox's pid 1)"),
        Check("no host secrets", not facts["secrets_visible"], ", ".join(facts["secrets_visible"]) or "none visible"),
    ]


def run_posture_probe(isolation: Optional[str] = None) -> dict:
    from ._sync import Sandbox

    with Sandbox(isolation=isolation) as sb:
        execution = sb.run_code(POSTURE_PROBE)
        if execution.error:
            raise RuntimeError(f"posture probe failed: {execution.error.name}: {execution.error.value}")
        return json.loads("".join(execution.logs.stdout))


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _read_int(path: str) -> Optional[int]:
    value = _read(path)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
