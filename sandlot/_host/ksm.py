"""Kernel same-page merging (KSM) for sandboxes: opt-in, host-wide, with a bounded scan rate.

Idle sessions forked from one zygote hold many identical private pages (copy-on-write copies that
reference counting dirtied the same way in each). With ``SANDLOT_KSM=1`` (or ``sandlot serve --ksm``)
every sandbox's processes are marked mergeable (``PR_SET_MEMORY_MERGE``, set in the zygote before it
forks and in exec'd boots) and, if ksmd is off, this process turns it on with the scan budget below
and puts the three knobs back as it found them when it exits.

KSM is one setting for the whole host and cannot be scoped to a tenant: pages of different tenants'
sandboxes merge with each other. That makes page-deduplication timing side channels possible (a write
to a merged page takes a copy-on-write fault, so a sandbox can learn whether another holds a page with
given contents). It is therefore off unless the operator asks, and documented with that threat.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import signal
import threading
from pathlib import Path
from typing import Optional

KSM = Path("/sys/kernel/mm/ksm")
# The budget Sandlot starts ksmd with: 1,000 pages (4 MB) every 20 ms, at most 200 MB/s scanned. ksmd
# scans every page a sandbox maps (~60,000 per idle pandas sandbox: the zygote's image), not only its
# private ones, and keeps 64 bytes of bookkeeping for each (~3.7 MB per sandbox). Measured here by
# bench/density_ksm.py (2 cores): 50 sessions converge in ~7 min using 28% of one core, and ksmd keeps
# rescanning at ~30% while they live (its cost follows this budget, not the number of sandboxes). An
# operator who started ksmd with settings of their own (a smaller pages_to_scan: less CPU, slower
# merging) keeps them: Sandlot only turns it on when it is off.
PAGES_TO_SCAN = 1000
SLEEP_MILLISECS = 20
KNOBS = ("pages_to_scan", "sleep_millisecs", "run")  # restored in this order: run last

_lock = threading.Lock()
_saved: Optional[dict] = None  # the knobs as found, when this process turned ksmd on
_engaged: "Optional[Status]" = None  # what the first engage() of this process found or made (later calls: no I/O)


@dataclasses.dataclass(frozen=True)
class Status:
    available: bool  # the kernel has KSM and per-process merging (PR_SET_MEMORY_MERGE, Linux >= 6.4)
    running: bool  # ksmd scans (run = 1)
    pages_to_scan: Optional[int] = None
    sleep_millisecs: Optional[int] = None
    pages_sharing: Optional[int] = None  # pages saved: mappings that point at a merged page
    general_profit: Optional[int] = None  # bytes saved, less ksmd's own bookkeeping
    why: str = ""


def _read(name: str) -> Optional[int]:
    try:
        return int((KSM / name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _write(name: str, value: int) -> None:
    (KSM / name).write_text(f"{value}\n")


def status() -> Status:
    run = _read("run")
    if run is None:
        return Status(False, False, why="the kernel has no KSM (/sys/kernel/mm/ksm)")
    if not os.path.exists("/proc/self/ksm_stat"):
        return Status(False, run == 1, why="the kernel has no per-process KSM (PR_SET_MEMORY_MERGE needs Linux >= 6.4)")
    return Status(True, run == 1, _read("pages_to_scan"), _read("sleep_millisecs"), _read("pages_sharing"),
                  _read("general_profit"))


def engage() -> Status:
    """Make sure ksmd runs for the sandboxes this process marks mergeable: turn it on with Sandlot's
    budget if it is off (and only then: an operator's ksmd keeps its settings), once per process, and
    restore what was found at exit. Without the right to (not root), ksmd stays as it is."""
    global _saved, _engaged
    with _lock:
        if _engaged is not None:  # once per process: a sandbox start reads nothing more
            return _engaged
        now = status()
        if not now.available or now.running or _read("run") != 0:
            _engaged = now  # run = 2 (unmerge everything) is an operator's explicit choice too
            return now
        saved = {name: _read(name) for name in KNOBS}
        try:
            _write("pages_to_scan", PAGES_TO_SCAN)
            _write("sleep_millisecs", SLEEP_MILLISECS)
            _write("run", 1)
        except OSError:
            _put_back(saved)
        else:
            _saved = saved
            atexit.register(release)
        _engaged = status()
        return _engaged


def ask() -> Status:
    """An operator's ``--ksm`` (``sandlot serve``, ``python -m sandlot.server``): as SANDLOT_KSM=1 for every
    sandbox this process starts from now on, and ksmd engaged at once (so the server can say where it stands)."""
    from .. import _config

    _config.ask_ksm()
    now = engage()
    if _saved is not None and threading.current_thread() is threading.main_thread():
        # uvicorn ends a server by re-raising the SIGTERM it caught once it has shut down, under the handler
        # it found: the default one would end the process before atexit puts ksmd back.
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _release_then_die)
    return now


def _release_then_die(signum: int, frame) -> None:
    release()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)  # ends as SIGTERM would have, exit status included


def release() -> None:
    """Put ksmd's knobs back as this process found them (if it changed them). Pages already merged stay
    merged (run = 0 stops scanning; it does not unmerge), and split again as sandboxes write them."""
    global _saved, _engaged
    with _lock:
        saved, _saved, _engaged = _saved, None, None
    if saved is not None:
        _put_back(saved)


def _put_back(saved: dict) -> None:
    for name in KNOBS:
        if saved.get(name) is not None:
            try:
                _write(name, saved[name])
            except OSError:
                pass


def process_merges(pid: int) -> Optional[bool]:
    """Whether ``pid``'s memory is marked mergeable as a whole (``ksm_merge_any`` in /proc/PID/ksm_stat);
    None when the kernel does not say."""
    try:
        text = Path(f"/proc/{pid}/ksm_stat").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "ksm_merge_any":
            return value.strip() == "yes"
    return None
