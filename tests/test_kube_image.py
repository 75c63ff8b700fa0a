"""`sandlot kube image`: the kubernetes tier's agent image, built with skopeo and umoci (no container daemon).

The base is made in the test from this host's own files (tests/imagekit.py: dash, coreutils and Debian's
python3.11), pushed to Debian's docker-registry on loopback; the built image is pushed there too and pulled back
with skopeo, and its layers and configuration are read: the agent's sources at /opt/sandlot/_agent, user 1000,
workdir /home/user, the pod's command as entrypoint. Skips, saying why, without skopeo, umoci or docker-registry.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from sandlot.cli import main

from . import imagekit

_MISSING = [t for t in ("skopeo", "umoci", "docker-registry") if shutil.which(t) is None]
pytestmark = [
    pytest.mark.skipif(bool(_MISSING), reason=f"{_MISSING} not installed (scripts/setup installs them)"),
    pytest.mark.skipif(imagekit.available() is not None, reason=str(imagekit.available())),
]
ENTRYPOINT = ["python3", "-I", "-S", "-B", "/opt/sandlot/_agent/pod.py"]


@pytest.fixture(scope="module")
def layers():
    """(base, python): dash and coreutils; Debian's python3.11 on top."""
    return imagekit.base_layer(), imagekit.python_layer()


@pytest.fixture(scope="module")
def registry(tmp_path_factory, layers):
    """A registry on loopback holding sandlot/py:1 (a base with python3) and sandlot/base:1 (one without)."""
    work = tmp_path_factory.mktemp("kube-image")
    base, py = layers
    layout = work / "layout"
    imagekit.write_layout(layout, {
        "base": ([base], {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "WorkingDir": "/"}),
        "py": ([base, py], {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", "HOME=/root"],
                            "WorkingDir": "/srv", "Cmd": ["python3"]}),
    })
    registry = imagekit.Registry(work / "registry")
    try:
        registry.push(layout, "base", "sandlot/base:1")
        registry.push(layout, "py", "sandlot/py:1")
        yield registry
    finally:
        registry.stop()


def pull_back(source: str, dest: Path) -> tuple[dict, dict, list[Path]]:
    """(manifest, config, layer blobs) of ``source`` copied into a fresh OCI layout by skopeo."""
    subprocess.run(["skopeo", "copy", "--insecure-policy", "--src-tls-verify=false", source, f"oci:{dest}:it"],
                   check=True, capture_output=True)
    index = json.loads((dest / "index.json").read_text())
    blob = lambda digest: dest / "blobs/sha256" / digest.split(":", 1)[1]  # noqa: E731
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_bytes())
    config = json.loads(blob(manifest["config"]["digest"]).read_bytes())
    return manifest, config, [blob(layer["digest"]) for layer in manifest["layers"]]


def test_built_pushed_and_pulled_back_with_the_agent_and_its_configuration(registry, tmp_path):
    from sandlot._kube_image import agent_sources

    archive = tmp_path / "agent.tar"
    result = CliRunner().invoke(main, ["kube", "image", "--base", f"{registry.host}/sandlot/py:1",
                                       "--tag", f"{registry.host}/sandlot/agent:1", "--push", "--insecure",
                                       "--output", str(archive)])
    assert result.exit_code == 0, result.output
    digest = result.stdout.strip().splitlines()[-1]
    assert digest.startswith("sha256:")

    manifest, config, layers = pull_back(f"docker://{registry.host}/sandlot/agent:1", tmp_path / "back")
    _, base_config, base_layers = pull_back(f"docker://{registry.host}/sandlot/py:1", tmp_path / "base")
    # The base's layers, unchanged and shared, then one of Sandlot's.
    assert [p.name for p in layers[:-1]] == [p.name for p in base_layers] and len(layers) == len(base_layers) + 1
    cfg = config["config"]
    assert cfg["User"] == "1000:1000"
    assert cfg["WorkingDir"] == "/home/user"
    assert cfg["Entrypoint"] == ENTRYPOINT and cfg["Cmd"] == ["--port", "8888"]
    assert "PATH=/usr/local/bin:/usr/bin:/bin" in cfg["Env"]
    assert [e for e in cfg["Env"] if e.startswith("HOME=")] == ["HOME=/home/user"]  # the base's /root replaced

    with tarfile.open(layers[-1]) as tar:
        members = {m.name.lstrip("./"): m for m in tar}
        sources = agent_sources()
        expected = {str(p.relative_to(sources)) for p in sources.rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
        shipped = {name[len("opt/sandlot/_agent/"):] for name, m in members.items()
                   if name.startswith("opt/sandlot/_agent/") and m.isfile()}
        assert shipped == expected and "server.py" in shipped and "protocol.py" in shipped
        for rel in ("server.py", "protocol.py"):
            member = members[f"opt/sandlot/_agent/{rel}"]
            assert tar.extractfile(member).read() == (sources / rel).read_bytes()
            assert member.uid == 0 and member.mode == 0o644  # the sandbox's user reads, never rewrites, its agent
        home = members["home/user"]
        assert home.isdir() and home.uid == home.gid == 1000
        assert not [n for n in members if "__pycache__" in n or n.endswith(".pyc")]

    # The archive holds the same image, for registries skopeo cannot reach from here.
    from_archive, _, _ = pull_back(f"oci-archive:{archive}", tmp_path / "archive")
    assert from_archive["layers"] == manifest["layers"]


def test_the_agent_layer_is_the_same_bytes_each_time():
    from sandlot._kube_image import agent_layer

    assert agent_layer() == agent_layer()


def test_a_base_without_python3_is_refused_before_anything_is_pushed(registry):
    result = CliRunner().invoke(main, ["kube", "image", "--base", f"{registry.host}/sandlot/base:1",
                                       "--tag", f"{registry.host}/sandlot/nopython:1", "--push", "--insecure"])
    assert result.exit_code == 3, result.output
    assert "no python3 on its PATH" in result.output
    missing = subprocess.run(["skopeo", "inspect", "--tls-verify=false",
                              f"docker://{registry.host}/sandlot/nopython:1"], capture_output=True, text=True)
    assert missing.returncode != 0


@pytest.mark.parametrize("args, message", [
    (["--base", "Bad Ref", "--tag", "127.0.0.1:1/x:1", "--push"], "bad image reference"),
    (["--base", "127.0.0.1:1/x:1", "--tag", "127.0.0.1:1/y:1"], "--push, --output FILE, or both"),
    (["--base", "127.0.0.1:1/x:1", "--tag", "127.0.0.1:1/y@sha256:" + "0" * 64, "--push"], "a tag, not a digest"),
])
def test_bad_input_is_a_usage_error(args, message):
    result = CliRunner().invoke(main, ["kube", "image", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_an_unreachable_registry_says_so(tmp_path):
    port = imagekit.free_port()  # nothing listens there
    result = CliRunner().invoke(main, ["kube", "image", "--base", f"127.0.0.1:{port}/sandlot/py:1",
                                       "--tag", f"127.0.0.1:{port}/sandlot/agent:1", "--push", "--insecure"])
    assert result.exit_code == 3, result.output
    assert "cannot reach" in result.output


def test_python3_is_found_through_the_bases_own_symlinks_and_must_be_new_enough():
    from sandlot import ImageError
    from sandlot._kube_image import find_python

    merged_usr = {"bin": "usr/bin", "usr": None, "usr/bin": None, "usr/bin/python3": "python3.11",
                  "usr/bin/python3.11": None}
    assert find_python(merged_usr, {"config": {"Env": ["PATH=/bin"]}}) == "/usr/bin/python3.11"
    local = {"usr": None, "usr/local": None, "usr/local/bin": None,
             "usr/local/bin/python3": "/usr/local/bin/python3.12", "usr/local/bin/python3.12": None}
    assert find_python(local, {"config": {}}) == "/usr/local/bin/python3.12"  # no PATH: the usual one
    old = {"usr": None, "usr/bin": None, "usr/bin/python3": "python3.6", "usr/bin/python3.6": None}
    with pytest.raises(ImageError, match="python3 is 3.6; the agent needs 3.8"):
        find_python(old, {"config": {"Env": ["PATH=/usr/bin"]}})
    dangling = {"usr": None, "usr/bin": None, "usr/bin/python3": "python3.11"}
    with pytest.raises(ImageError, match="no python3 on its PATH"):
        find_python(dangling, {"config": {"Env": ["PATH=/usr/bin"]}})
    loop = {"usr": None, "usr/bin": None, "usr/bin/python3": "python3"}
    with pytest.raises(ImageError, match="no python3"):
        find_python(loop, {"config": {"Env": ["PATH=/usr/bin"]}})


def test_a_python3_a_later_layer_deleted_is_not_found(tmp_path, layers):
    from sandlot import ImageError
    from sandlot._kube_image import _manifest, _tree, find_python

    deleting = imagekit._Layer()
    deleting.add_file("/usr/bin/.wh.python3", b"")  # an OCI whiteout: the layers below lose usr/bin/python3
    layout = tmp_path / "layout"
    config = {"Env": ["PATH=/usr/bin:/bin"]}
    imagekit.write_layout(layout, {"with": (list(layers), config),
                                   "without": ([*layers, deleting.finish()], config)})
    _, manifest, cfg = _manifest(layout, "with")
    assert find_python(_tree(layout, manifest), cfg) == "/usr/bin/python3.11"
    _, manifest, cfg = _manifest(layout, "without")
    with pytest.raises(ImageError, match="no python3 on its PATH"):
        find_python(_tree(layout, manifest), cfg)
