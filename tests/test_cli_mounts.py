"""`sandlot run -v` and `sandlot volume` through the real CLI entry point: a host repo edited by the agent and
owned by its owner, volumes made, used, listed and removed (locally and on a server), bad -v syntax refused."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .cli_server import COMMAND, clean_env
from .conftest import needs_sandbox
from .serverproc import ServerProcess

pytestmark = needs_sandbox
OWNER = 1234


def sandlot(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 90):
    return subprocess.run(COMMAND + list(args), capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


@pytest.fixture
def env(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    return clean_env(SANDLOT_DATA_DIR=str(data))  # this test's own volumes, never the machine's


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "work" / "repo"
    repo.mkdir(parents=True)
    (repo / "app.py").write_text("print('v1')\n")
    for p in (repo, repo / "app.py"):
        os.chown(p, OWNER, OWNER)
    return repo


def test_run_edits_a_relative_repo_and_the_files_are_its_owners(repo, env):
    code = ("import subprocess\n"
            "subprocess.run(['sh', '-c', 'echo edited > /project/notes.txt'], check=True)\n"
            "open('/project/app.py', 'a').write(\"print('v2')\\n\")\n"
            "print(sorted(__import__('os').listdir('/project')))")
    r = sandlot("run", "-v", "./repo:/project:rw", code, cwd=repo.parent, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "['app.py', 'notes.txt']\n"
    assert (repo / "notes.txt").read_text() == "edited\n"
    assert (repo / "app.py").read_text() == "print('v1')\nprint('v2')\n"
    for name in ("notes.txt", "app.py"):
        st = (repo / name).stat()
        assert (st.st_uid, st.st_gid) == (OWNER, OWNER), name
    # Without :rw the grant is read-only: the code fails (exit 1) and the repo is untouched.
    r = sandlot("run", "-v", "repo:/project", "open('/project/app.py', 'w').write('gone')", cwd=repo.parent, env=env)
    assert r.returncode == 1 and "Read-only file system" in r.stderr
    assert (repo / "app.py").read_text() == "print('v1')\nprint('v2')\n"


def test_volume_create_ls_use_rm_round_trip(env):
    r = sandlot("volume", "create", "pipcache", "--size", "32M", "--inodes", "1000", "--json", env=env)
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["name"] == "pipcache" and made["size"] == 32 * 1024**2
    assert 900 <= made["inodes"] <= 1100  # mkfs rounds the cap to whole inode tables
    r = sandlot("run", "-v", "vol:pipcache:/cache", "open('/cache/wheel', 'w').write('kept')", env=env)
    assert r.returncode == 0, r.stderr
    r = sandlot("run", "-v", "vol:pipcache:/cache:ro", "print(open('/cache/wheel').read())", env=env)
    assert (r.returncode, r.stdout) == (0, "kept\n"), r.stderr
    r = sandlot("volume", "ls", env=env)
    assert r.returncode == 0 and "pipcache" in r.stdout and "32M" in r.stdout, r.stderr
    listed = json.loads(sandlot("volume", "ls", "--json", env=env).stdout)
    assert [(v["name"], v["in_use"]) for v in listed] == [("pipcache", False)]
    info = json.loads(sandlot("volume", "info", "pipcache", "--json", env=env).stdout)
    assert info["size"] == made["size"] and 0 < info["allocated"] < info["size"]
    r = sandlot("volume", "create", "pipcache", env=env)
    assert r.returncode == 2 and "already exists" in r.stderr
    r = sandlot("volume", "rm", "pipcache", env=env)
    assert r.returncode == 0 and "deleted volume pipcache" in r.stderr
    r = sandlot("volume", "ls", env=env)
    assert r.returncode == 0 and r.stdout == "" and "no volumes" in r.stderr
    r = sandlot("volume", "info", "pipcache", env=env)
    assert r.returncode == 2 and "no volume 'pipcache'" in r.stderr


@pytest.mark.parametrize("spec, says", [
    ("/srv/data", "expected HOSTDIR:TARGET"),
    ("./repo:project", "must be an absolute path inside the sandbox"),
    ("vol:cache", "expected HOSTDIR:TARGET"),
    ("vol:cache:ro", "must be an absolute path inside the sandbox"),
    ("vol::/cache", "expected HOSTDIR:TARGET"),
    (":/data", "expected HOSTDIR:TARGET"),
    ("vol:Bad_Name!:/cache", "volume name"),
    ("./repo:/data/../etc", "normalised"),
    ("/etc:/data", "sensitive location"),
    ("./missing:/data", "does not exist"),
])
def test_bad_volume_flags_are_usage_errors(repo, env, spec, says):
    r = sandlot("run", "-v", spec, "print('never runs')", cwd=repo.parent, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert says in r.stderr and "never runs" not in r.stdout


def test_the_same_target_twice_is_a_usage_error(repo, env):
    r = sandlot("run", "-v", "./repo:/data", "-v", "vol:x:/data", "1", cwd=repo.parent, env=env)
    assert r.returncode == 2 and "'/data' is given twice" in r.stderr


def test_volume_commands_and_run_v_against_a_server(tmp_path, repo):
    data = tmp_path / "server-data"
    data.mkdir()
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("SANDLOT_API")}
    server_env.update(SANDLOT_DATA_DIR=str(data), SANDLOT_POOL_MIN="0")
    server = ServerProcess(tmp_path / "sandlot.db", "--host-dir-root", str(repo.parent), env=server_env).start()
    try:
        env = clean_env(SANDLOT_API_URL=server.url, SANDLOT_API_KEY=server.key("cli"))
        r = sandlot("volume", "create", "remote-cache", "--size", "16M", env=env)
        assert r.returncode == 0, r.stderr
        r = sandlot("run", "-v", "vol:remote-cache:/cache", "-v", f"{repo}:/project",
                    "open('/cache/x', 'w').write(open('/project/app.py').read())", env=env)
        assert r.returncode == 0, r.stderr
        r = sandlot("run", "-v", "vol:remote-cache:/cache", "print(open('/cache/x').read(), end='')", env=env)
        assert (r.returncode, r.stdout) == (0, "print('v1')\n"), r.stderr
        assert [v["name"] for v in json.loads(sandlot("volume", "ls", "--json", env=env).stdout)] == ["remote-cache"]
        # The server's volumes are the tenant's, not this machine's.
        local = clean_env(SANDLOT_DATA_DIR=str(tmp_path / "elsewhere"))
        assert sandlot("volume", "ls", "--json", env=local).stdout.strip() == "[]"
        (tmp_path / "outside").mkdir()
        r = sandlot("run", "-v", f"{tmp_path / 'outside'}:/data", "1", env=env)  # not within the operator's root
        assert r.returncode == 2 and "outside the directories the operator allows" in r.stderr
        r = sandlot("volume", "rm", "remote-cache", env=env)
        assert r.returncode == 0, r.stderr
    finally:
        server.stop()


def test_shell_v_grants_the_repo_to_the_session(repo, env):
    cells = "!echo from-shell > /project/shell.txt\nprint(open('/project/shell.txt').read().strip())\n"
    r = subprocess.run(COMMAND + ["shell", "-v", "./repo:/project:rw"], input=cells, capture_output=True, text=True,
                       cwd=repo.parent, env=env, timeout=90)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["from-shell"]
    made = repo / "shell.txt"
    assert made.read_text() == "from-shell\n" and made.stat().st_uid == OWNER
    r = sandlot("shell", "sb-x", "-v", "./repo:/project", env=env)
    assert r.returncode == 2 and "-v applies to a new sandbox" in r.stderr


@pytest.mark.parametrize("root, says", [("/etc", "sensitive location"), ("/nonexistent-root", "does not exist")])
def test_serve_refuses_a_host_dir_root_that_could_never_be_granted(tmp_path, env, root, says):
    r = sandlot("serve", "--db", str(tmp_path / "s.db"), "--port", "0", "--host-dir-root", root, env=env, timeout=30)
    assert r.returncode == 2 and says in r.stderr, r.stderr
