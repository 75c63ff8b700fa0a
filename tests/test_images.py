"""OCI images as templates: a real registry on loopback, real pulls, sandboxes of the pulled images
on both tiers, builds from sandbox.yaml, and the failures (bad reference, unreachable registry,
corrupt layer) that must leave the image cache as it was.

The images are made in the test from this host's own files (tests/imagekit.py): "base" (dash and a
few coreutils) and "py" (base + Debian's python3.11), so they share a layer. Needs skopeo, umoci and
docker-registry (scripts/setup installs them); skips, saying why, without them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import sandlot
from sandlot import InvalidRequest

from . import imagekit
from .conftest import PROBLEM

_MISSING = [t for t in ("skopeo", "umoci", "docker-registry") if shutil.which(t) is None]
pytestmark = [
    pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM)),
    pytest.mark.skipif(bool(_MISSING), reason=f"{_MISSING} not installed (scripts/setup installs them)"),
    pytest.mark.skipif(imagekit.available() is not None, reason=str(imagekit.available())),
]
NAMES = ("img-py", "img-py-digest", "img-base", "img-built", "img-broken", "img-oci", "img-docker", "img-py38",
         "img-rm-a", "img-rm-b", "img-debian", "img-debian-jq")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A private data dir, the test images, and a registry on loopback holding them."""
    from sandlot import _images

    work = tmp_path_factory.mktemp("images")
    saved = os.environ.get("SANDLOT_DATA_DIR")
    os.environ["SANDLOT_DATA_DIR"] = str(work / "data")
    for name in NAMES:
        sandlot.configure_pool(name, min_ready=0)  # the pool test turns its own on
    base, py = imagekit.base_layer(), imagekit.python_layer()
    layout = work / "layout"
    digests = imagekit.write_layout(layout, {
        "base": ([base], {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello", "HOME=/root"],
                          "WorkingDir": "/"}),
        "py": ([base, py], {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"], "WorkingDir": "/srv"}),
    })
    registry = imagekit.Registry(work / "registry")
    try:
        registry.push(layout, "base", "sandlot/base:1")
        registry.push(layout, "py", "sandlot/py:1")
        _images.pull(f"{registry.host}/sandlot/py:1", "img-py", tls_verify=False)
        _images.pull(f"{registry.host}/sandlot/base:1", "img-base", tls_verify=False)
        yield {"registry": registry, "digests": digests, "layout": layout, "work": work}
    finally:
        registry.stop()
        if saved is None:
            os.environ.pop("SANDLOT_DATA_DIR", None)
        else:
            os.environ["SANDLOT_DATA_DIR"] = saved


def cache_state() -> dict:
    """Everything a failed pull must leave as it was (blobs may only be complete, verified ones)."""
    from sandlot import _images, _templates

    index = json.loads((_images.layout_dir() / "index.json").read_text())
    blobs = _images.layout_dir() / "blobs/sha256"
    for blob in blobs.iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"a bad blob {blob.name} is in the cache"
    return {
        "records": sorted(p.name for p in _templates.records_dir().iterdir()),
        "roots": sorted(p.name for p in _images.rootfs_dir().iterdir()),
        "tags": sorted(d["annotations"]["org.opencontainers.image.ref.name"] for d in index["manifests"]),
    }


# -- pulls ---------------------------------------------------------------------------------------------
def test_pull_by_tag_and_by_digest_share_layers(world):
    from sandlot import _images

    record = sandlot._templates.read_record("img-py")
    assert record["digest"] == world["digests"]["py"]
    assert (record["python"], record["python_version"]) == ("/usr/bin/python3", "3.11")
    assert record["workdir"] == "/srv" and record["env"]["LANG"] == "C.UTF-8"
    base = sandlot._templates.read_record("img-base")
    assert base["python"] is None and base["env"]["GREETING"] == "hello" and "HOME" not in base["env"]

    by_digest = _images.pull(f"{world['registry'].host}/sandlot/py@{world['digests']['py']}", "img-py-digest",
                             tls_verify=False)
    assert by_digest["digest"] == record["digest"] and by_digest["rootfs"] == record["rootfs"]
    # One copy of every blob: the base layer is shared by both images, the py image by both names.
    blobs = sorted(p.name for p in (_images.layout_dir() / "blobs/sha256").iterdir())
    assert len(blobs) == 6, blobs  # 2 layers, 2 configs, 2 manifests
    assert len(list(_images.rootfs_dir().iterdir())) == 2
    tmpl = sandlot._templates.get_template("img-py-digest")
    assert tmpl.rootfs == record["rootfs"] and tmpl.python == "/usr/bin/python3"


def test_bad_reference_is_a_clear_error(world):
    from sandlot import _images

    before = cache_state()
    for ref in ("Bad Ref", "UPPER/case:1", f"{world['registry'].host}/x/y:bad tag", "oci:/tmp/x", "", "a@sha256:12"):
        with pytest.raises(InvalidRequest, match="image reference|not a registry reference|reference is needed"):
            _images.pull(ref, "img-broken", tls_verify=False)
    assert cache_state() == before


def test_unreachable_registry_is_a_clear_error(world):
    from sandlot import _images

    before = cache_state()
    port = imagekit.free_port()
    with pytest.raises(_images.ImageError, match=f"cannot reach the registry 127.0.0.1:{port}.*connection refused"):
        _images.pull(f"127.0.0.1:{port}/sandlot/py:1", "img-broken", tls_verify=False)
    with pytest.raises(_images.ImageError, match="plain HTTP.*--insecure"):
        _images.pull(f"{world['registry'].host}/sandlot/py:1", "img-broken")  # TLS verify on: refused
    with pytest.raises(_images.ImageError, match="not found"):
        _images.pull(f"{world['registry'].host}/sandlot/nothing:1", "img-broken", tls_verify=False)
    assert cache_state() == before


def test_corrupt_layer_is_a_clear_error_and_leaves_the_cache_consistent(world):
    from sandlot import _images

    layer = imagekit._Layer()
    layer.add_file("/payload.bin", os.urandom(256 * 1024))
    blob = layer.finish()
    layout = world["work"] / "corrupt-layout"
    imagekit.write_layout(layout, {"c": ([blob], {"Env": []})})
    registry = world["registry"]
    registry.push(layout, "c", "sandlot/corrupt:1")
    stored = registry.blob_path("sha256:" + hashlib.sha256(blob[0]).hexdigest())
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    before = cache_state()
    with pytest.raises(_images.ImageError, match="corrupt"):
        _images.pull(f"{registry.host}/sandlot/corrupt:1", "img-broken", tls_verify=False)
    assert cache_state() == before
    with pytest.raises(InvalidRequest, match="unknown template"):
        sandlot._templates.get_template("img-broken")


# -- sandboxes of pulled images ----------------------------------------------------------------------
def test_process_tier_runs_the_image(world):
    with sandlot.Sandbox("img-py") as sb:
        r = sb.commands.run("id -u; cat /etc/passwd; cat /root/secret; touch /x; cat /proc/1/cmdline; echo; ls /opt/sandlot")
        lines = r.stdout.splitlines()
        assert lines[0] == "1000"
        assert any(line.startswith("user:x:1000:1000:") for line in lines)
        assert any(line.startswith("daemon:x:1:1:") for line in lines)  # the image's own accounts are kept
        assert "secret" not in r.stdout and "Permission denied" in r.stderr
        assert "Read-only file system" in r.stderr
        # pid 1 is the image's interpreter (its argv; its exe link is closed to the user, as pid 1 is not theirs)
        assert "/usr/bin/python3\x00-I\x00-S\x00-B\x00/opt/sandlot/_agent/boot.py\x00" in r.stdout
        ex = sb.run_code(
            "import os, sys, json\n"
            "st = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)\n"
            "print(json.dumps({'exe': sys.executable, 'version': sys.version.split()[0], 'cwd': os.getcwd(),\n"
            "  'seccomp': st['Seccomp'].strip(), 'nnp': st['NoNewPrivs'].strip(), 'cap': st['CapEff'].strip(),\n"
            "  'pyenv': os.path.exists('/root/.pyenv'), 'home_is_dir': os.path.isdir('/home') and not os.path.islink('/home'),\n"
            "  'opt_link': os.path.islink('/opt'), 'lang': os.environ.get('LANG')}))\n"
            "6 * 7")
        assert ex.error is None, ex.error
        facts = json.loads("".join(ex.logs.stdout))
        assert ex.text == "42"
        assert facts["exe"] == "/usr/bin/python3" and facts["version"].startswith("3.11")
        assert (facts["seccomp"], facts["nnp"], facts["cap"]) == ("2", "1", "0000000000000000")
        assert facts["home_is_dir"] and not facts["opt_link"] and not facts["pyenv"]
        assert facts["lang"] == "C.UTF-8"
        assert facts["cwd"] == "/home/user"  # WorkingDir /srv does not exist in the image
        sb.files.write("notes.txt", "kept")
        assert sb.files.read("/home/user/notes.txt") == "kept"
        assert sb.run_code("open('notes.txt').read()").text == "'kept'"


def test_image_without_python_serves_commands_and_files(world):
    with sandlot.Sandbox("img-base") as sb:
        r = sb.commands.run("echo $GREETING; id -un; ls /usr/bin | wc -l")
        assert r.exit_code == 0 and r.stdout.splitlines()[:2] == ["hello", "user"]
        sb.files.write("/tmp/a.txt", b"bytes\x00here")
        assert sb.files.read("/tmp/a.txt", format="bytes") == b"bytes\x00here"
        ex = sb.run_code("1 + 1")
        assert ex.error is not None and ex.error.name == "InvalidRequest"
        assert "has no Python >= 3.8" in ex.error.value and "commands.run and files work" in ex.error.value


@pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc (Debian package `runsc`) is not installed")
def test_gvisor_tier_runs_the_images(world):
    with sandlot.Sandbox("img-py", isolation="gvisor") as sb:
        ex = sb.run_code("import sys, os; print(sys.executable, os.getuid()); 6 * 7")
        assert ex.text == "42" and "".join(ex.logs.stdout).split() == ["/usr/bin/python3", "1000"]
        r = sb.commands.run("cat /root/secret; echo hi > /usr/x")
        assert "cat: /root/secret: Permission denied" in r.stderr and "cannot create /usr/x" in r.stderr
        assert "secret" not in r.stdout
    with sandlot.Sandbox("img-base", isolation="gvisor") as sb:
        r = sb.commands.run("echo $GREETING; id -u")
        assert r.stdout.split() == ["hello", "1000"]
        assert sb.run_code("1").error.name == "InvalidRequest"
        sb.files.write("f.txt", "x")
        assert sb.files.read("f.txt") == "x"


def test_mounts_in_an_image_template(world):
    """A grant at a new top-level path of an image's read-only root (process tier: a private shadow of the
    root for this sandbox, the image's own files still there); on gVisor a target must exist in the image or
    lie under home or /tmp, and any other is refused before anything boots."""
    project = world["work"] / "mount-project"
    project.mkdir()
    os.chown(project, 1234, 1234)
    with sandlot.Sandbox("img-py", mounts={"/project": f"{project}:rw"}) as sb:
        r = sb.commands.run("echo edit > /project/a.txt && ls /project && ls /usr/bin/python3 && cat /etc/passwd && "
                            "touch /newdir 2>&1; ls /")
        assert r.stdout.splitlines()[:2] == ["a.txt", "/usr/bin/python3"], r.stdout + r.stderr
        assert "daemon:x:1:1:" in r.stdout  # the image's own files, through the shadowed root
        assert "Read-only file system" in r.stdout  # the shadowed root is read-only too
        assert "project" in r.stdout.split()
    assert (project / "a.txt").read_text() == "edit\n" and (project / "a.txt").stat().st_uid == 1234
    with sandlot.Sandbox("img-py") as sb:  # the next sandbox of the image never sees that target
        assert "project" not in sb.commands.run("ls /").stdout.split()
    if shutil.which("runsc") is None:
        return
    with sandlot.Sandbox("img-py", isolation="gvisor", mounts={"/home/user/p": str(project)}) as sb:
        assert sb.commands.run("cat /home/user/p/a.txt").stdout == "edit\n"
    with pytest.raises(sandlot.InvalidRequest, match="does not exist in this image"):
        sandlot.Sandbox("img-py", isolation="gvisor", mounts={"/project": str(project)})


# -- sandbox.yaml ------------------------------------------------------------------------------------
def _context(work: Path, yaml_text: str) -> Path:
    ctx = work / f"ctx-{time.monotonic_ns()}"
    (ctx / "app").mkdir(parents=True)
    imagekit.make_wheel(ctx / "wheels", "mylib", "1.0", "ANSWER = 42\n")
    (ctx / "app" / "main.py").write_text("print('app says hi')\n")
    (ctx / "run.sh").write_text("#!/bin/sh\necho run.sh here\n")
    (ctx / "sandbox.yaml").write_text(yaml_text)
    return ctx / "sandbox.yaml"


def test_build_from_sandbox_yaml(world):
    from sandlot import _sandboxfile

    path = _context(world["work"], """
base: img-py
pip: [./wheels/mylib-1.0-py3-none-any.whl]
files:
  - {src: app/, dest: /app/}
  - {src: run.sh, dest: /usr/local/bin/runme, mode: "0755"}
env: {APP_MODE: test}
workdir: /app
preload: [mylib]
limits: {memory: 512M, cpu: 0.5}
pool_size: 1
""")
    events = []
    record = _sandboxfile.build(str(path), "img-built", progress=events.append)
    steps = [e["step"] for e in events if e["phase"] == "step"]
    assert steps == ["base", "pip", "files", "check", "commit"]
    assert record["python"] == "/usr/bin/python3" and record["preload"] == ["mylib"]
    assert record["limits"] == {"memory": "512M", "cpu": 0.5} and record["pool_size"] == 1
    template = sandlot._templates.get_template("img-built")
    assert template.workdir == "/app" and dict(template.env)["APP_MODE"] == "test"
    base_root = Path(sandlot._templates.read_record("img-py")["rootfs"])
    assert not (base_root / "app").exists()  # the base image was never written
    # owners were shifted back: nothing in the new root belongs to a sandbox uid range on the host
    assert all(os.lstat(os.path.join(d, f)).st_uid < 65536 for d, _, fs in os.walk(record["rootfs"]) for f in fs)
    with sandlot.Sandbox("img-built") as sb:
        r = sb.commands.run("pwd; echo $APP_MODE; /usr/local/bin/runme; python3 main.py")
        assert r.stdout.split("\n")[:4] == ["/app", "test", "run.sh here", "app says hi"], (r.stdout, r.stderr)
        ex = sb.run_code("import sys; ('mylib' in sys.modules, __import__('mylib').ANSWER)")
        assert ex.text == "(True, 42)", ex  # preloaded by the agent, before the first call


def test_template_pool_size_fills_a_warm_pool(world):
    from sandlot._engine import default_engine

    if "SANDLOT_POOL_MIN" in os.environ:
        pytest.skip("SANDLOT_POOL_MIN overrides the template's pool size")
    if sandlot._templates.read_record("img-built") is None:
        pytest.skip("needs test_build_from_sandbox_yaml")
    pools = default_engine().pools
    pools.forget_configuration("img-built")  # let the template's own pool_size (1) apply
    try:
        async def run():
            async with sandlot.AsyncSandbox("img-built") as sb:
                for _ in range(200):
                    if pools.stats().get("img-built"):
                        break
                    await asyncio.sleep(0.05)
                ready = pools.stats().get("img-built")
                await sb.commands.run("true")
            await pools.close()
            return ready

        import asyncio

        assert asyncio.run(run()) == 1
    finally:
        sandlot.configure_pool("img-built", min_ready=0)


def test_failing_build_step_is_named_and_leaves_nothing(world):
    from sandlot import _images, _sandboxfile

    before = cache_state()
    path = _context(world["work"], "base: img-py\npreload: [no_such_module_here]\n")
    with pytest.raises(_images.ImageError, match=r"build step 2/3 \(check\) failed.*No module named 'no_such_module_here'"):
        _sandboxfile.build(str(path), "img-broken")
    path = _context(world["work"], "base: img-base\npip: [./wheels/mylib-1.0-py3-none-any.whl]\n")
    with pytest.raises(_images.ImageError, match=r"step 2/4 \(pip\) failed: pip packages need Python"):
        _sandboxfile.build(str(path), "img-broken")
    with pytest.raises(InvalidRequest, match="apt: .*not a Debian package name"):
        _sandboxfile.build(str(_context(world["work"], "base: img-py\napt: ['curl; rm -rf /']\n")), "img-broken")
    with pytest.raises(InvalidRequest, match="pip: .*not options"):
        _sandboxfile.build(str(_context(world["work"], "base: img-py\npip: ['--index-url=http://x']\n")), "img-broken")
    with pytest.raises(InvalidRequest, match="run: Extra inputs are not permitted"):
        _sandboxfile.build(str(_context(world["work"], "base: img-py\nrun: [whoami]\n")), "img-broken")
    assert cache_state() == before
    assert not any((_images.images_dir() / "builds").iterdir())


# -- load, ls, rm, CLI -------------------------------------------------------------------------------
def test_load_oci_and_docker_archives(world):
    from sandlot import _images

    oci = world["work"] / "py-oci.tar"
    docker = world["work"] / "py-docker.tar"
    subprocess.run(["skopeo", "copy", "--insecure-policy", f"oci:{world['layout']}:py", f"oci-archive:{oci}:py"],
                   check=True, capture_output=True)
    subprocess.run(["skopeo", "copy", "--insecure-policy", f"oci:{world['layout']}:py",
                    f"docker-archive:{docker}:sandlot/py:1"], check=True, capture_output=True)
    record = _images.load(str(oci), "img-oci")
    assert record["digest"] == world["digests"]["py"] and record["python"] == "/usr/bin/python3"
    record = _images.load(str(docker), "img-docker")
    assert record["python_version"] == "3.11" and record["source"] == "load"
    with sandlot.Sandbox("img-docker") as sb:
        assert sb.run_code("2 + 2").text == "4"
    junk = world["work"] / "junk.tar"
    junk.write_bytes(b"not a tarball at all")
    before = cache_state()
    with pytest.raises(InvalidRequest, match="not a readable tarball|neither"):
        _images.load(str(junk), "img-broken")
    assert cache_state() == before


def test_rm_keeps_shared_roots_and_refuses_while_in_use(world):
    from sandlot import _images

    host = world["registry"].host
    a = _images.pull(f"{host}/sandlot/base:1", "img-rm-a", tls_verify=False)
    b = _images.pull(f"{host}/sandlot/base:1", "img-rm-b", tls_verify=False)
    assert a["rootfs"] == b["rootfs"] == sandlot._templates.read_record("img-base")["rootfs"]
    _images.remove("img-rm-a")
    assert Path(b["rootfs"]).is_dir() and "img-rm-a" not in cache_state()["tags"]
    with sandlot.Sandbox("img-rm-b"):
        _images.remove("img-base")  # the root is still img-rm-b's: removing img-base is fine
        assert Path(b["rootfs"]).is_dir()
        with pytest.raises(InvalidRequest, match="in use by running sandboxes"):
            _images.remove("img-rm-b")
    _images.remove("img-rm-b")
    assert not Path(b["rootfs"]).exists()
    blobs = {p.name for p in (_images.layout_dir() / "blobs/sha256").iterdir()}
    assert world["digests"]["base"].split(":")[1] not in blobs  # its manifest was swept
    for name in ("python", "no-such-template"):
        with pytest.raises(InvalidRequest):
            _images.remove(name)
    _images.pull(f"{host}/sandlot/base:1", "img-base", tls_verify=False)  # for the tests after this one


def test_cli(world):
    from sandlot.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["template", "ls", "--json"])
    assert result.exit_code == 0, result.output
    names = [row["name"] for row in json.loads(result.stdout)]
    assert names[0] == "python" and "img-py" in names
    result = runner.invoke(main, ["template", "ls"])
    assert "img-py" in result.stdout and "NAME" in result.stdout
    result = runner.invoke(main, ["template", "pull", "Not A Ref"])
    assert result.exit_code == 2 and "bad image reference" in result.stderr
    result = runner.invoke(main, ["template", "pull", f"127.0.0.1:{imagekit.free_port()}/a/b:1", "--tls-verify=false",
                                  "-q"])
    assert result.exit_code == 3 and "cannot reach the registry" in result.stderr
    result = runner.invoke(main, ["template", "pull", f"{world['registry'].host}/sandlot/py:1", "--insecure",
                                  "--name", "img-py-digest", "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["digest"] == world["digests"]["py"]
    result = runner.invoke(main, ["template", "rm", "python"])
    assert result.exit_code == 2


PY38 = Path("/root/.pyenv/versions/3.8.18")


@pytest.mark.skipif(not (PY38 / "bin/python3.8").exists(), reason="no Python 3.8 on this host to make an image of")
def test_an_image_with_python_3_8_runs_the_agent(world):
    """The agent is stdlib-only Python >= 3.8: an image whose only Python is 3.8 runs it."""
    from sandlot import _images

    layer = imagekit._Layer()
    layer.add_file("/usr/local/bin/python3.8", (PY38 / "bin/python3.8").read_bytes(), 0o755)
    layer._entry("/usr/local/bin/python3", type=imagekit.tarfile.SYMTYPE, linkname="python3.8", mode=0o777)
    lib = PY38 / "lib/libpython3.8.so.1.0"
    layer.add_file("/usr/lib/x86_64-linux-gnu/libpython3.8.so.1.0", lib.read_bytes(), 0o755)
    stdlib = PY38 / "lib/python3.8"
    skip = imagekit.STDLIB_SKIP | {"site-packages", "distutils", "config-3.8-x86_64-linux-gnu"}
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in skip]
        rel = os.path.relpath(dirpath, stdlib)
        for name in filenames:
            if name.endswith((".py", ".so")):
                dest = "/usr/local/lib/python3.8/" + ("" if rel == "." else rel + "/") + name
                layer.add_file(dest, Path(dirpath, name).read_bytes(), 0o644)
    for dep in imagekit._libs([str(PY38 / "bin/python3.8")] + [str(p) for p in (stdlib / "lib-dynload").glob("*.so")]):
        if "libpython" not in dep:
            layer.add(dep)
    layout = world["work"] / "py38-layout"
    imagekit.write_layout(layout, {"py38": ([imagekit.base_layer(), layer.finish()], {"Env": []})})
    record = _images.load(str(layout), "img-py38")
    assert (record["python"], record["python_version"]) == ("/usr/local/bin/python3", "3.8")
    with sandlot.Sandbox("img-py38") as sb:
        ex = sb.run_code("import sys; x = sys.version_info[:2]\nx")
        assert ex.text == "(3, 8)", ex
        assert sb.commands.run("echo ok").stdout == "ok\n"


def _reachable(host: str, port: int = 80) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap (Debian package) is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="apt in a build needs Sandlot running as root")
def test_build_with_apt_on_a_debian_image(world):
    """A real Debian root (mmdebstrap --variant=apt, about 40 s), then `apt: [jq]` installed by a build
    step, as root of its own user namespace on a private copy, in a network namespace of its own: apt
    reaches the mirror its sources name only through the build's allowlisting proxy."""
    from sandlot import _images, _sandboxfile

    if not _reachable("deb.debian.org"):
        pytest.skip("deb.debian.org is not reachable")
    tar = world["work"] / "debian.tar"
    subprocess.run(["mmdebstrap", "--quiet", "--variant=apt", "--format=tar", "bookworm", str(tar),
                    "http://deb.debian.org/debian"], check=True, capture_output=True, timeout=600)
    raw = tar.read_bytes()
    blob = (imagekit.gzip.compress(raw, compresslevel=1, mtime=0), "sha256:" + hashlib.sha256(raw).hexdigest())
    del raw
    layout = world["work"] / "debian-layout"
    imagekit.write_layout(layout, {"bookworm": ([blob], {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                                                                 "/usr/bin:/sbin:/bin"]})})
    record = _images.load(str(layout), "img-debian")
    assert record["python"] is None
    path = _context(world["work"], "base: img-debian\napt: [jq]\nfiles: [{src: app/, dest: /app/}]\n")
    events = []
    record = _sandboxfile.build(str(path), "img-debian-jq", progress=events.append)
    assert [e["step"] for e in events if e["phase"] == "step"] == ["base", "apt", "files", "check", "commit"]
    assert any("jq" in e["message"] for e in events if e["phase"] == "log")
    assert any(e["message"].startswith("apt may reach: deb.debian.org") for e in events if e["phase"] == "log")
    with sandlot.Sandbox("img-debian-jq") as sb:
        r = sb.commands.run("echo '{\"a\": 5}' | jq .a; dpkg-query -W -f='${Status}' jq; id -u; ls /app")
        assert r.stdout.split("\n")[:3] == ["5", "install ok installed1000", "main.py"], (r.stdout, r.stderr)
    assert all(os.lstat(os.path.join(d, f)).st_uid < 65536 for d, _, fs in os.walk(record["rootfs"]) for f in fs)
