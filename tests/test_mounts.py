"""Mounts (issue #9): host directories granted read-only or writable, and named volumes, on both tiers,
through the local SDK. What a user relies on: exactly the directory, read-only unless ``:rw``, the
sandbox's files owned on the host by the directory's owner, the files API honouring both, clear refusals
(with nothing left behind), and volumes that keep their data, their caps and their one-writer rule.

Hostile cases (planted links, setuid, escapes) are in test_mounts_hostile.py."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sandlot
from sandlot import FileError, InvalidRequest, Sandbox

from .conftest import (GRANT_OWNER, RUNSC_MISSING, mounts_under, needs_sandbox, own_sandbox_cgroups, owned_dir,
                       wait_until_released)

pytestmark = [needs_sandbox, pytest.mark.usefixtures("tier")]
if os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(reason="host directories and volumes need Sandlot to run as root"))

WORKTREE = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def private_data_dir(volume_home):
    """Every test here on a data directory of its own (volumes, gVisor's attached grants): afterwards nothing
    may be left mounted under it or on a loop device (checked by volume_home)."""
    yield volume_home


def output(sb: Sandbox, code: str) -> str:
    """What ``code`` printed, run in the sandbox's Python session; its exception fails the test."""
    ex = sb.run_code(code)
    assert ex.error is None, f"{ex.error.name}: {ex.error.value}\n{ex.error.traceback}"
    return "".join(ex.logs.stdout)


@pytest.fixture
def project(tmp_path) -> Path:
    """A host project owned by the grant owner: a file, a subdirectory, and a sibling beside it."""
    proj = owned_dir(tmp_path / "project")
    (proj / "README").write_text("hello from the host\n")
    owned_dir(proj / "src")
    (proj / "src" / "main.py").write_text("print('main')\n")
    for path in (proj / "README", proj / "src" / "main.py"):
        os.chown(path, GRANT_OWNER, GRANT_OWNER)
    (tmp_path / "sibling.txt").write_text("SIBLING-NOT-GRANTED\n")
    return proj


def host_tree(path: Path) -> dict:
    """Every entry under ``path``: relative name -> (uid, gid, mode, content for files)."""
    tree = {}
    for entry in sorted(path.rglob("*")):
        st = entry.lstat()
        content = entry.read_bytes() if entry.is_file() and not entry.is_symlink() else None
        tree[str(entry.relative_to(path))] = (st.st_uid, st.st_gid, st.st_mode, content)
    return tree


# -- read-only -----------------------------------------------------------------------------------------
def test_read_only_grant_reads_and_refuses_every_write(project):
    before = host_tree(project)
    with Sandbox(mounts={"/data": str(project)}) as sb:
        # Listing and reading, by commands and by the files API.
        assert sb.commands.run("cat /data/README").stdout == "hello from the host\n"
        assert sorted(e.name for e in sb.files.list("/data")) == ["README", "src"]
        assert sb.files.read("/data/src/main.py") == "print('main')\n"
        assert sb.files.stat("/data/README").size == len("hello from the host\n")
        assert sb.files.exists("/data/src")
        # Writes: refused by the shell and the files API alike, each with the file system's own answer.
        r = sb.commands.run("echo x > /data/README; touch /data/new; mkdir /data/d; rm /data/src/main.py;"
                            " mv /data/README /data/R2; echo done")
        assert r.stdout == "done\n"
        assert r.stderr.count("Read-only file system") >= 4, r.stderr
        for attempt in (lambda: sb.files.write("/data/README", "overwritten"),
                        lambda: sb.files.write("/data/new.txt", "x"),
                        lambda: sb.files.mkdir("/data/newdir"),
                        lambda: sb.files.remove("/data/src/main.py")):
            with pytest.raises(FileError) as caught:
                attempt()
            assert caught.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM), caught.value
        assert output(sb, "import os; print(os.access('/data', os.W_OK))") == "False\n"
    assert host_tree(project) == before  # the host's files untouched, to the byte and the mode


def test_ro_suffix_and_default_are_the_same(project):
    with Sandbox(mounts={"/data": f"{project}:ro"}) as sb:
        with pytest.raises(FileError):
            sb.files.write("/data/x", "x")
    assert not (project / "x").exists()


# -- writable ------------------------------------------------------------------------------------------
def test_writable_grant_writes_as_the_directory_owner(project):
    with Sandbox(mounts={"/project": f"{project}:rw"}) as sb:
        sb.commands.run("mkdir -p /project/out/deep && echo made > /project/out/deep/by-shell.txt", timeout=30)
        sb.files.write("/project/by-files-api.txt", "via the files API")
        sb.files.mkdir("/project/api-dir")
        output(sb, "open('/project/by-python.txt', 'w').write('py')\nimport os; os.symlink('README', '/project/link')")
        # Inside, the granted directory and its owner's files are the sandbox user's (uid 1000), so it can
        # edit the project like its own.
        st = output(sb, "import os\nfor p in ('/project', '/project/README', '/project/out'):\n"
                        "    s = os.stat(p); print(p, s.st_uid, s.st_gid)")
        assert st.split("\n")[:3] == ["/project 1000 1000", "/project/README 1000 1000", "/project/out 1000 1000"]
        sb.files.write("/project/README", "edited by the agent\n")
        assert sb.files.read("/project/README") == "edited by the agent\n"
        # The files API, the whole of it, inside a writable grant.
        names = {e.name for e in sb.files.list("/project")}
        assert {"README", "src", "out", "by-files-api.txt", "api-dir", "by-python.txt", "link"} <= names
        assert sb.files.stat("/project/api-dir").type == "dir"
        sb.files.write("/project/api-dir/tmp.txt", "gone soon")
        sb.files.remove("/project/api-dir/tmp.txt")
        assert not sb.files.exists("/project/api-dir/tmp.txt")
        # Host-side view while it runs: the same files.
        assert (project / "by-files-api.txt").read_text() == "via the files API"
    assert (project / "README").read_text() == "edited by the agent\n"
    assert (project / "out" / "deep" / "by-shell.txt").read_text() == "made\n"
    # Everything the sandbox made belongs to the directory's owner on the host, never a stray high uid.
    for entry in [project, *project.rglob("*")]:
        st = entry.lstat()
        assert (st.st_uid, st.st_gid) == (GRANT_OWNER, GRANT_OWNER), f"{entry}: {st.st_uid}:{st.st_gid}"


def test_files_of_another_owner_inside_a_writable_grant_keep_their_permissions(project):
    secret = project / "root-only"
    secret.write_text("ROOT-ONLY-CONTENT")
    secret.chmod(0o600)  # owned by root, inside a grant owned by someone else
    shared = project / "root-readable"
    shared.write_text("world readable")
    shared.chmod(0o644)
    with Sandbox(mounts={"/project": f"{project}:rw"}) as sb:
        with pytest.raises(FileError):
            sb.files.read("/project/root-only")
        r = sb.commands.run("cat /project/root-only; echo x >> /project/root-only; rm -f /project/root-only;"
                            " echo x >> /project/root-readable; true")
        assert "ROOT-ONLY-CONTENT" not in r.stdout
        assert sb.files.read("/project/root-readable") == "world readable"
        # The owner's directory lets the user unlink entries in it (POSIX), but never read or change others'.
    assert "ROOT-ONLY-CONTENT" not in r.stdout + r.stderr
    assert shared.read_text() == "world readable"
    if secret.exists():
        assert secret.read_text() == "ROOT-ONLY-CONTENT"


# -- exactly the directory -----------------------------------------------------------------------------
def test_exactly_the_directory_not_its_parent_siblings_or_submounts(project, tmp_path):
    inner = owned_dir(project / "mounted-below")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "sandlot-test-below", str(inner)], check=True)
    try:
        (inner / "on-the-submount").write_text("SUBMOUNT-CONTENT")
        with Sandbox(mounts={"/data": f"{project}:rw"}) as sb:
            listing = output(sb, "import os\nprint(sorted(os.listdir('/data')))\n"
                                 "print(os.listdir('/data/mounted-below'))\n"
                                 "print(os.path.exists('/data/../sibling.txt'))")
            assert listing == "['README', 'mounted-below', 'src']\n[]\nFalse\n"
            r = sb.commands.run(f"cat {tmp_path}/sibling.txt /data/../sibling.txt; ls {tmp_path}; true")
            assert "SIBLING-NOT-GRANTED" not in r.stdout
            with pytest.raises(FileError):
                sb.files.read("/data/mounted-below/on-the-submount")
            with pytest.raises(FileError):
                sb.files.read(str(tmp_path / "sibling.txt"))
            # What the sandbox writes in the directory under the submount goes to the directory, not the tmpfs.
            sb.files.write("/data/mounted-below/from-sandbox", "under")
        assert not (inner / "from-sandbox").exists()
        assert (inner / "on-the-submount").read_text() == "SUBMOUNT-CONTENT"
    finally:
        subprocess.run(["umount", str(inner)], check=True)
    assert (inner / "from-sandbox").read_text() == "under"


def test_dotdot_and_absolute_paths_stay_inside_the_sandbox(project, tmp_path):
    with open("/etc/passwd") as f:
        host_passwd = f.read()
    with Sandbox(mounts={"/data": str(project)}) as sb:
        # /etc/passwd through the grant is the sandbox's own, never the host's.
        theirs = sb.files.read("/data/../etc/passwd")
        assert "user:x:1000:1000" in theirs and theirs != host_passwd
        with pytest.raises(FileError):
            sb.files.read("/data/../etc/shadow")
        with pytest.raises(FileError):
            sb.files.read("/data/../../../../etc/shadow")
        with pytest.raises(FileError):
            sb.files.read(f"/data/../{project}/README")  # the host path means nothing inside
        # A write through '..' out of a read-only grant lands where the path leads inside: home.
        sb.files.write("/data/../home/user/x", "in home")
        assert sb.files.read("/home/user/x") == "in home"
        with pytest.raises(FileError):
            sb.files.write("/data/../x", "root is read-only")
        with pytest.raises(FileError):
            sb.files.write("/data/./src/../new", "still the read-only grant")
    assert not (project / "new").exists() and not (tmp_path / "x").exists()
    assert not (project.parent / "home").exists()


def test_target_in_home_and_several_grants(project, tmp_path):
    other = owned_dir(tmp_path / "other")
    (other / "o.txt").write_text("other")
    os.chown(other / "o.txt", GRANT_OWNER, GRANT_OWNER)
    with Sandbox(mounts={"/home/user/project": f"{project}:rw", "/srv/other": str(other)}) as sb:
        sb.files.write("/home/user/project/from-home", "x")
        assert sb.files.read("/srv/other/o.txt") == "other"
        with pytest.raises(FileError):
            sb.files.write("/srv/other/nope", "x")
        # The home around the grant is still the sandbox's own scratch.
        sb.files.write("/home/user/scratch.txt", "scratch")
        home = output(sb, "import os; print(sorted(os.listdir('/home/user')))")
        assert "'project'" in home and "'scratch.txt'" in home
    assert (project / "from-home").read_text() == "x"
    assert (project / "from-home").stat().st_uid == GRANT_OWNER
    assert not (project / "scratch.txt").exists()


@pytest.mark.tiers("process")
@pytest.mark.parametrize("boot", ["zygote", "exec"])
def test_sixteen_grants_through_either_boot(tmp_path, monkeypatch, boot):
    """The most a sandbox may have: every descriptor reaches pid 1, whether it is forked by the zygote (they
    travel with the fork request) or exec'd (passed to the boot process), in the order of the targets."""
    monkeypatch.setenv("SANDLOT_ZYGOTE", "1" if boot == "zygote" else "0")
    mounts = {}
    for i in range(16):
        d = owned_dir(tmp_path / f"d{i:02}")
        (d / "id").write_text(str(i))
        mounts[f"/m{i:02}"] = f"{d}:rw" if i % 2 else str(d)
    with Sandbox(mounts=mounts) as sb:
        assert sb.commands.run("cat /m*/id").stdout == "".join(str(i) for i in range(16))
        r = sb.commands.run("touch /m01/new /m00/new")
        assert "Read-only" in r.stderr and "/m00" in r.stderr
    assert (tmp_path / "d01" / "new").exists() and not (tmp_path / "d00" / "new").exists()
    with pytest.raises(InvalidRequest, match="at most 16"):
        Sandbox(mounts=dict(mounts, **{"/m16": str(tmp_path / "d00")}))


# -- refusals ------------------------------------------------------------------------------------------
def refused(mounts, *, match: str) -> None:
    """``Sandbox(mounts=...)`` is an InvalidRequest saying ``match``, and no sandbox was left behind."""
    before = own_sandbox_cgroups()
    with pytest.raises(InvalidRequest, match=match):
        with Sandbox(mounts=mounts):
            pass
    assert own_sandbox_cgroups() <= before


@pytest.mark.tiers("process")
@pytest.mark.parametrize("path", ["/", "/etc", "/etc/ssl", "/proc", "/proc/self", "/sys", "/sys/fs", "/dev",
                                  "/dev/shm", "/root", "/root/.ssh", "/boot", "/run"])
def test_sensitive_host_paths_are_refused(path):
    if not os.path.lexists(path):
        pytest.skip(f"{path} does not exist on this host")
    refused({"/data": path}, match="sensitive")


@pytest.mark.tiers("process")
def test_sandlots_own_state_is_refused(tmp_path, monkeypatch):
    data = tmp_path / "state" / "sandlot-data"
    (data / "volumes").mkdir(parents=True)
    monkeypatch.setenv("SANDLOT_DATA_DIR", str(data))
    for path in (data, data / "volumes", data.parent):  # the data dir, inside it, and a parent holding it
        refused({"/data": str(path)}, match="Sandlot's own state")


@pytest.mark.tiers("process")
def test_missing_paths_files_and_root_owned_writable_grants_are_refused(project, tmp_path):
    refused({"/data": str(tmp_path / "nothing-here")}, match="does not exist")
    refused({"/data": str(project / "README")}, match="not a directory")
    root_owned = tmp_path / "root-owned"
    root_owned.mkdir()
    refused({"/data": f"{root_owned}:rw"}, match="owned by root")
    refused({"/data": "relative/path"}, match="absolute path")
    refused({"/data": str(project), "/cache": "vol:no-such-volume"}, match="no volume")


@pytest.mark.tiers("process")
def test_bad_targets_are_refused(project):
    for target, match in [("data", "absolute"), ("/data/", "normalised"), ("/data/../etc", "normalised"),
                          ("/usr", "reserved"), ("/usr/local/x", "reserved"), ("/proc", "reserved"),
                          ("/home/user", "reserved"), ("/tmp", "reserved"), ("/", "reserved"),
                          ("/opt/sandlot/x", "reserved"), ("/etc/x", "reserved"), ("/d:x", "':'")]:
        refused({target: str(project)}, match=match)
    refused({"/data": str(project), "/data/inner": str(project)}, match="may not nest")
    from sandlot._templates import get_template

    prefix = get_template("python").prefixes[0]  # the interpreter's tree, bound into every sandbox
    top = "/" + prefix.strip("/").split("/")[0]
    if top not in ("/usr", "/opt", "/root", "/home", "/tmp"):
        refused({top: str(project)}, match="sandbox's Python")
    refused({prefix: str(project)}, match="sandbox's Python|reserved")


# -- volumes -------------------------------------------------------------------------------------------
@pytest.mark.tiers("process")
def test_volume_names_are_checked(volume_home):
    for bad in ("", "A", "-x", ".hidden", "a/b", "..", "x" * 64, "a b", "vol:x"):
        with pytest.raises(InvalidRequest):
            sandlot.volumes.create(bad, size="16M")
    with pytest.raises(InvalidRequest):
        Sandbox(mounts={"/cache": "vol:../etc"})
    with pytest.raises(InvalidRequest, match="size"):
        sandlot.volumes.create("tiny", size="1M")
    # More inodes than the size can hold is the caller's mistake (ext4: one per KiB at most), not the host's.
    with pytest.raises(InvalidRequest, match="inodes"):
        sandlot.volumes.create("crowded", size="16M", inodes=100_000)
    # The largest size allowed either works or is a SandlotError saying why, never a bare OSError.
    try:
        sandlot.volumes.create("huge", size="16T")
    except sandlot.SandlotError as exc:
        assert "huge" in str(exc) or "16" in str(exc)
    else:
        sandlot.volumes.delete("huge")
    assert [p.name for p in (volume_home / "volumes" / "local").iterdir()] == []  # nothing half-made left
    info = sandlot.volumes.create("ok.name_1-x", size="16M")
    assert (info.name, info.size, info.in_use) == ("ok.name_1-x", 16 * 1024**2, False)
    with pytest.raises(InvalidRequest, match="already exists"):
        sandlot.volumes.create("ok.name_1-x", size="16M")
    assert [v.name for v in sandlot.volumes.list()] == ["ok.name_1-x"]
    with pytest.raises(InvalidRequest, match="no volume"):
        sandlot.volumes.info("missing")
    with pytest.raises(InvalidRequest, match="no volume"):
        sandlot.volumes.delete("missing")


@pytest.mark.tiers("process")
def test_volume_keeps_data_across_sandboxes_and_tiers(volume_home):
    sandlot.volumes.create("keep", size="32M")
    with Sandbox(mounts={"/cache": "vol:keep"}) as sb:
        assert sb.files.list("/cache") == []  # empty: no lost+found
        sb.files.write("/cache/wheel.txt", "kept")
        sb.commands.run("mkdir -p /cache/pip/http && echo deep > /cache/pip/http/entry")
        assert output(sb, "import os; s = os.stat('/cache'); print(s.st_uid, s.st_gid)") == "1000 1000\n"
    with Sandbox(mounts={"/cache": "vol:keep"}) as sb:
        assert sb.files.read("/cache/wheel.txt") == "kept"
        assert sb.files.read("/cache/pip/http/entry") == "deep\n"
    if RUNSC_MISSING is None:  # written by the process tier, read and written by gVisor, and back
        with Sandbox(isolation="gvisor", mounts={"/cache": "vol:keep"}) as sb:
            assert sb.files.read("/cache/wheel.txt") == "kept"
            sb.files.write("/cache/from-gvisor", "g")
            assert output(sb, "import os; s = os.stat('/cache/wheel.txt'); print(s.st_uid)") == "1000\n"
        with Sandbox(mounts={"/cache": "vol:keep:ro"}) as sb:
            assert sb.files.read("/cache/from-gvisor") == "g"
    assert sandlot.volumes.info("keep").in_use is False
    assert sandlot.volumes.info("keep").allocated > 0


def test_full_volume_is_enospc_and_the_sandbox_lives(volume_home):
    sandlot.volumes.create("small", size="16M")
    with Sandbox(mounts={"/cache": "vol:small"}) as sb:
        got = output(sb, "import errno\nwritten = 0\ntry:\n"
                         "    with open('/cache/fill', 'wb') as f:\n"
                         "        for _ in range(64):\n"
                         "            f.write(b'x' * (1 << 20)); f.flush(); written += 1\n"
                         "        f.close()\n"
                         "except OSError as e:\n    print(errno.errorcode[e.errno], written)\n")
        code, written = got.split()
        assert code == "ENOSPC" and 8 <= int(written) < 17, got
        # Still alive, still answering; the files API gets the same answer.
        assert sb.run_code("21 * 2").text == "42"
        assert sb.commands.run("echo alive").stdout == "alive\n"
        with pytest.raises(FileError) as caught:
            sb.files.write("/cache/more", b"y" * (4 << 20))
        assert caught.value.errno == errno.ENOSPC or "No space" in str(caught.value)
        sb.files.remove("/cache/fill")  # and freeing space works again
        sb.files.write("/cache/after", b"z" * (1 << 20))
    assert sandlot.volumes.info("small").size == 16 * 1024**2


def test_volume_inode_cap_is_enospc_and_the_sandbox_lives(volume_home):
    info = sandlot.volumes.create("few", size="16M", inodes=64)
    assert info.inodes < 1000  # the cap asked for (ext4 rounds it to whole groups)
    with Sandbox(mounts={"/cache": "vol:few"}) as sb:
        got = output(sb, "import errno\nn = 0\ntry:\n    while n < 100000:\n"
                         "        open('/cache/f%d' % n, 'w').close(); n += 1\n"
                         "except OSError as e:\n    print(errno.errorcode[e.errno], n)\n")
        code, made = got.split()
        assert code == "ENOSPC" and 0 < int(made) <= info.inodes, (got, info)
        assert sb.commands.run("echo alive").stdout == "alive\n"
        with pytest.raises(FileError):
            sb.files.mkdir("/cache/one-more-dir")


@pytest.mark.tiers("process")
def test_one_writer_or_many_readers(volume_home):
    sandlot.volumes.create("shared", size="16M")
    with Sandbox(mounts={"/cache": "vol:shared"}) as writer:
        writer.files.write("/cache/v", "1")
        refused({"/cache": "vol:shared"}, match="in use")
        refused({"/cache": "vol:shared:ro"}, match="in use")
        assert sandlot.volumes.info("shared").in_use
        with pytest.raises(InvalidRequest, match="mounted"):
            sandlot.volumes.delete("shared")
        writer.kill()
        # Free the moment kill() returns: a new writer takes it at once.
        with Sandbox(mounts={"/cache": "vol:shared"}) as second:
            assert second.files.read("/cache/v") == "1"
            second.files.write("/cache/v", "2")
    with Sandbox(mounts={"/cache": "vol:shared:ro"}) as r1, Sandbox(mounts={"/r": "vol:shared:ro"}) as r2:
        assert r1.files.read("/cache/v") == r2.files.read("/r/v") == "2"
        with pytest.raises(FileError):
            r1.files.write("/cache/w", "x")
        refused({"/cache": "vol:shared"}, match="in use")
        with pytest.raises(InvalidRequest, match="mounted"):
            sandlot.volumes.delete("shared")
    sandlot.volumes.delete("shared")
    assert sandlot.volumes.list() == []
    assert wait_until_released(volume_home) == ([], [])


@pytest.mark.tiers("process")
def test_volume_survives_a_new_python_process(volume_home):
    """A 'reboot' stand-in: the image file is all there is; another process mounts it again."""
    def run(code: str) -> str:
        done = subprocess.run([sys.executable, "-c", code], cwd=WORKTREE, capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, SANDLOT_DATA_DIR=str(volume_home)))
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("import sandlot\nsandlot.volumes.create('boot', size='16M')\n"
        "with sandlot.Sandbox(mounts={'/v': 'vol:boot'}) as sb:\n    sb.files.write('/v/state', 'from process one')\n")
    assert wait_until_released(volume_home) == ([], [])
    images = list(volume_home.rglob("image.ext4"))
    assert len(images) == 1
    assert run("import sandlot\nprint(sandlot.volumes.info('boot').in_use)\n"
               "with sandlot.Sandbox(mounts={'/v': 'vol:boot:ro'}) as sb:\n    print(sb.files.read('/v/state'))\n") \
        == "False\nfrom process one\n"


@pytest.mark.tiers("process")
def test_after_an_owner_crashed_readers_writers_and_delete_work(volume_home):
    """The process that held a writer is killed (-9): its host mount stays until someone sweeps it. A reader
    must not fail on it ('already mounted'), and info/delete must not call the volume in use for ever."""
    sandlot.volumes.create("crash", size="16M")
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sandlot, time\n"
         "sb = sandlot.Sandbox(mounts={'/c': 'vol:crash'}).__enter__()\n"
         "sb.files.write('/c/state', 'before the crash')\nsb.commands.run('sync')\n"
         "print('ready', flush=True)\ntime.sleep(120)\n"],
        cwd=WORKTREE, stdout=subprocess.PIPE, text=True, env=dict(os.environ, SANDLOT_DATA_DIR=str(volume_home)))
    try:
        assert owner.stdout.readline() == "ready\n"
    finally:
        owner.kill()
        owner.wait()
    with Sandbox(mounts={"/c": "vol:crash:ro"}) as sb:
        assert sb.files.read("/c/state") == "before the crash"
    assert sandlot.volumes.info("crash").in_use is False
    with Sandbox(mounts={"/c": "vol:crash"}) as sb:
        sb.files.write("/c/state", "after")
    sandlot.volumes.delete("crash")
    assert wait_until_released(volume_home) == ([], [])


@pytest.mark.tiers("process")
def test_a_failed_create_leaves_nothing_mounted(volume_home, project):
    """Volumes are attached before the sandbox boots: a later refusal must undo them."""
    sandlot.volumes.create("undo", size="16M")
    refused({"/cache": "vol:undo", "/data": str(project / "missing")}, match="does not exist")
    assert wait_until_released(volume_home) == ([], [])
    assert sandlot.volumes.info("undo").in_use is False
    refused({"/cache": "vol:undo", "/etc-like": "/etc"}, match="sensitive")
    assert mounts_under(volume_home) == []
    with Sandbox(mounts={"/cache": "vol:undo"}) as sb:  # and the lock was given back
        sb.files.write("/cache/ok", "ok")
