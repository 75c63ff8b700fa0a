"""Mounts and volumes on a real server, through the remote SDK: tenant-scoped volumes (CRUD, quotas, kept across a
server restart, invisible to other tenants), and host directories only inside the operator's --host-dir-root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from sandlot import InvalidRequest, QuotaExceeded, Sandbox, Volumes
from sandlot._storage.volumes import sweep_mounts
from sandlot.server import Store

from .conftest import RUNSC_MISSING, needs_sandbox
from .serverproc import ServerProcess

pytestmark = needs_sandbox
OWNER = 1234  # the host user who owns the granted project directory


def our_mounts(data_dir: Path) -> list[str]:
    """Host mounts under this module's private data dir (volumes attached for sandboxes)."""
    with open("/proc/mounts") as f:
        return [line for line in f if str(data_dir) in line]


def server_env(data_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDLOT_API")}
    env.update(SANDLOT_DATA_DIR=str(data_dir), SANDLOT_POOL_MIN="0")  # a private data dir; no spare sandboxes
    return env


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("srv-mounts")
    shared, outside, data = base / "shared", base / "outside", base / "data"
    for d in (shared, outside, data):
        d.mkdir()
    project = shared / "proj"
    project.mkdir()
    (project / "README").write_text("the owner's file\n")
    for p in (project, project / "README"):
        os.chown(p, OWNER, OWNER)
    (outside / "secret").write_text("not for tenants\n")
    (shared / "escape").symlink_to(outside)  # inside the root by name, outside once resolved
    return {"base": base, "shared": shared, "outside": outside, "project": project, "data": data}


@pytest.fixture(scope="module")
def server(site):
    proc = ServerProcess(site["base"] / "sandlot.db", "--host-dir-root", str(site["shared"]),
                         "--max-volumes", "3", "--total-volume-size", "200M", "--isolations", "process,gvisor",
                         env=server_env(site["data"])).start()
    try:
        proc.alice = proc.key("alice")
        proc.bob = proc.key("bob")
        proc.wait_warm(proc.alice)
        yield proc
    finally:
        proc.stop()
        assert our_mounts(site["data"]) == [], "a volume stayed mounted after the server stopped"


def remote(server, key) -> dict:
    return {"api_url": server.url, "api_key": key}


def test_volume_crud_through_the_remote_sdk(server):
    volumes = Volumes(**remote(server, server.alice))
    made = volumes.create("crud", size="32M", inodes=500)
    try:
        assert (made.name, made.size, made.in_use) == ("crud", 32 * 1024**2, False)
        assert 400 <= made.inodes <= 600 and made.allocated < made.size  # sparse: an empty volume takes little disk
        assert [v.name for v in volumes.list()] == ["crud"]
        assert volumes.info("crud") == made
        with pytest.raises(InvalidRequest, match="already exists"):
            volumes.create("crud", size="32M")
        with pytest.raises(InvalidRequest, match="volume name"):
            volumes.create("../etc", size="32M")
    finally:
        volumes.delete("crud")
    assert volumes.list() == []
    with pytest.raises(InvalidRequest, match="no volume 'crud'"):
        volumes.info("crud")
    rows = Store(server.db_path).audit_log("alice")
    actions = [(r.action, json.loads(r.detail)["name"]) for r in rows if r.action.startswith("volume_")]
    assert actions[:2] == [("volume_delete", "crud"), ("volume_create", "crud")]


def test_two_tenants_volumes_of_one_name_are_separate(server):
    alice, bob = Volumes(**remote(server, server.alice)), Volumes(**remote(server, server.bob))
    alice.create("shared-name", size="16M")
    bob.create("shared-name", size="16M")
    alice.create("alices-own", size="16M")
    try:
        for key, who in ((server.alice, "alice"), (server.bob, "bob")):
            with Sandbox(mounts={"/data": "vol:shared-name"}, **remote(server, key)) as sb:
                sb.files.write("/data/who", who)
        for key, who in ((server.alice, "alice"), (server.bob, "bob")):
            with Sandbox(mounts={"/data": "vol:shared-name:ro"}, **remote(server, key)) as sb:
                assert sb.files.read("/data/who") == who
        assert [v.name for v in bob.list()] == ["shared-name"]
        with pytest.raises(InvalidRequest, match="no volume 'alices-own'"):
            bob.info("alices-own")
        with pytest.raises(InvalidRequest, match="no volume 'alices-own'"):
            Sandbox(mounts={"/data": "vol:alices-own"}, **remote(server, server.bob))
    finally:
        alice.delete("shared-name")
        alice.delete("alices-own")
        bob.delete("shared-name")


TIERS = [pytest.param("process"),
         pytest.param("gvisor", marks=pytest.mark.skipif(RUNSC_MISSING is not None, reason=str(RUNSC_MISSING)))]


@pytest.mark.parametrize("isolation", TIERS)
def test_host_dir_inside_the_operators_roots(server, site, isolation):
    project = site["project"]
    (project / "new.txt").unlink(missing_ok=True)
    with Sandbox(mounts={"/project": f"{project}:rw", "/docs": str(project)}, isolation=isolation,
                 **remote(server, server.alice)) as sb:
        r = sb.commands.run("echo made > /project/new.txt && cat /project/README && id -u")
        assert r.exit_code == 0, r.stderr
        assert r.stdout.startswith("the owner's file\n")
        r = sb.commands.run("echo no > /docs/README")  # the same directory, granted read-only
        assert r.exit_code != 0 and "Read-only file system" in r.stderr
        assert sb.files.read("/docs/new.txt") == "made\n"
        sb_id = sb.sandbox_id
    made = project / "new.txt"
    assert made.read_text() == "made\n"
    assert (made.stat().st_uid, made.stat().st_gid) == (OWNER, OWNER)  # the directory's owner, not a sandbox uid
    assert (project / "README").read_text() == "the owner's file\n"
    detail = next(json.loads(r.detail) for r in Store(server.db_path).audit_log("alice", sandbox_id=sb_id)
                  if r.action == "create")
    assert detail["mounts"] == {"/docs": f"{project}:ro", "/project": f"{project}:rw"}
    info = httpx.get(server.url + "/v1/info", headers={"Authorization": f"Bearer {server.alice}"}).json()
    assert info["mounts"]["host_dirs"] is True and info["mounts"]["host_dir_roots"] == [str(site["shared"])]
    assert (info["quotas"]["max_volumes"], info["quotas"]["total_volume_size"]) == (3, 200 * 1024**2)


@pytest.mark.parametrize("isolation", TIERS)
def test_a_tenants_volume_on_each_tier(server, isolation):
    volumes = Volumes(**remote(server, server.bob))
    volumes.create("tiered", size="16M")
    try:
        with Sandbox(mounts={"/cache": "vol:tiered"}, isolation=isolation, **remote(server, server.bob)) as sb:
            sb.files.write("/cache/f", isolation)
            # The sandbox's own user owns what it wrote (os.stat: coreutils' statx fails on gVisor, mounts or not).
            assert sb.run_code("import os; os.stat('/cache/f').st_uid == os.getuid()").text == "True"
        with Sandbox(mounts={"/cache": "vol:tiered:ro"}, isolation=isolation, **remote(server, server.bob)) as sb:
            assert sb.files.read("/cache/f") == isolation
    finally:
        volumes.delete("tiered")


@pytest.mark.parametrize("where", ["outside", "escape", "/etc", "shared-root-parent"])
def test_host_dir_outside_the_operators_roots_is_refused(server, site, where):
    path = {"outside": str(site["outside"]), "escape": str(site["shared"] / "escape"), "/etc": "/etc",
            "shared-root-parent": str(site["base"])}[where]
    refusals = "outside the directories the operator allows|sensitive location|own state"
    with pytest.raises(InvalidRequest, match=refusals):
        Sandbox(mounts={"/data": path}, **remote(server, server.alice))
    assert server.proc.poll() is None


def test_volume_quotas(server):
    volumes = Volumes(**remote(server, server.alice))
    made = []
    try:
        for name in ("q1", "q2"):
            volumes.create(name, size="64M")
            made.append(name)
        with pytest.raises(QuotaExceeded, match="total volume size"):  # 128M taken, 100M more > 200M
            volumes.create("q3", size="100M")
        volumes.create("q3", size="64M")
        made.append("q3")
        with pytest.raises(QuotaExceeded, match="already has 3 volumes, its quota is 3"):
            volumes.create("q4", size="16M")
    finally:
        for name in made:
            volumes.delete(name)
    # A tenant's own quota overrides the server's default.
    dave = Volumes(**remote(server, server.key("dave", max_volumes=1)))
    dave.create("only", size="16M")
    try:
        with pytest.raises(QuotaExceeded, match="its quota is 1"):
            dave.create("second", size="16M")
    finally:
        dave.delete("only")


def test_delete_is_refused_while_mounted(server):
    volumes = Volumes(**remote(server, server.alice))
    volumes.create("busy", size="16M")
    try:
        with Sandbox(mounts={"/cache": "vol:busy"}, **remote(server, server.alice)) as sb:
            sb.files.write("/cache/f", "x")
            assert volumes.info("busy").in_use
            with pytest.raises(InvalidRequest, match="mounted"):
                volumes.delete("busy")
            assert sb.files.read("/cache/f") == "x"  # the refusal left the sandbox's volume alone
    finally:
        volumes.delete("busy")  # its sandbox is gone: now it can go


def test_volume_survives_a_server_restart_and_no_root_grants_nothing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    proj = tmp_path / "proj"
    proj.mkdir()
    first = ServerProcess(tmp_path / "sandlot.db", "--host-dir-root", str(tmp_path / "proj"),
                          env=server_env(data)).start()
    try:
        key = first.key("erin")
        Volumes(**remote(first, key)).create("keep", size="16M")
        with Sandbox(mounts={"/keep": "vol:keep"}, **remote(first, key)) as sb:
            sb.commands.run("mkdir -p /keep/work && echo 'still here' > /keep/work/note")
    finally:
        first.stop()
    second = ServerProcess(tmp_path / "sandlot.db", env=server_env(data)).start()  # no --host-dir-root
    try:
        volumes = Volumes(**remote(second, key))
        assert [v.name for v in volumes.list()] == ["keep"]
        with Sandbox(mounts={"/keep": "vol:keep:ro"}, **remote(second, key)) as sb:
            assert sb.files.read("/keep/work/note") == "still here\n"
        with pytest.raises(InvalidRequest, match="grants no host directories"):
            Sandbox(mounts={"/proj": str(proj)}, **remote(second, key))
        info = httpx.get(second.url + "/v1/info", headers={"Authorization": f"Bearer {key}"}).json()
        assert info["mounts"]["host_dirs"] is False and info["mounts"]["volumes"] == 1
        volumes.delete("keep")
    finally:
        second.stop()
    assert our_mounts(data) == []


def test_one_shot_run_with_mounts_over_rest(server, site):
    body = {"code": "print(open('/docs/README').read(), end='')", "mounts": {"/docs": str(site["project"])}}
    r = httpx.post(server.url + "/v1/run", json=body, headers={"Authorization": f"Bearer {server.alice}"},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["logs"]["stdout"] == ["the owner's file\n"]
    body["mounts"] = {"/docs": str(site["outside"])}
    r = httpx.post(server.url + "/v1/run", json=body, headers={"Authorization": f"Bearer {server.alice}"},
                   timeout=60)
    assert r.status_code == 400 and "outside the directories the operator allows" in r.json()["error"]["message"]
    body["mounts"] = {"docs": "vol:x"}  # malformed: refused by the schema, as the SDK would
    r = httpx.post(server.url + "/v1/run", json=body, headers={"Authorization": f"Bearer {server.alice}"},
                   timeout=60)
    assert r.status_code == 422 and "absolute" in r.json()["error"]["message"]
    rows = Store(server.db_path).audit_log("alice")
    assert any(r.action == "run_once_mounts" and str(site["project"]) in r.detail for r in rows)


def test_a_server_killed_with_a_volume_mounted_leaves_it_usable(tmp_path, monkeypatch):
    """SIGKILL while a sandbox writes a volume: the sandboxes die with the server, and the next server mounts the
    volume writable again and holds no stale host mount of it."""
    data = tmp_path / "data"
    data.mkdir()
    first = ServerProcess(tmp_path / "sandlot.db", env=server_env(data)).start()
    key = first.key("frank")
    try:
        Volumes(**remote(first, key)).create("crashy", size="16M")
        sb = Sandbox(mounts={"/v": "vol:crashy"}, **remote(first, key))
        sb.files.write("/v/before", "written")
        assert len(our_mounts(data)) == 1
    finally:
        first.kill9()
    second = ServerProcess(tmp_path / "sandlot.db", env=server_env(data)).start()
    try:
        volumes = Volumes(**remote(second, key))
        assert our_mounts(data) == [] and not volumes.info("crashy").in_use
        with Sandbox(mounts={"/v": "vol:crashy"}, **remote(second, key)) as sb:
            assert sb.files.read("/v/before") == "written"
        volumes.delete("crashy")
    finally:
        second.stop()
        monkeypatch.setenv("SANDLOT_DATA_DIR", str(data))
        leftover = sweep_mounts()  # whatever a failure above left mounted (its server is dead), never kept
    assert our_mounts(data) == [] and leftover == 0
