"""Network, as a user meets it: ``Sandbox(network=..., secrets=...)``, ``sb.network.update()`` and
``sb.network.log()``, locally and through a server, against the fake internet of tests/netlab.py.

Each test runs a driver script inside the lab's network namespace (the "host" of these tests: its
brokers dial the lab's TEST-NET hosts, and nothing can leave the machine). The driver uses only the
public SDK and prints JSON; the test checks it and what the lab's servers saw (and did not see).
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap

import pytest

import sandlot

from . import netlab
from .conftest import http_body_once_up, needs_sandbox

pytestmark = [needs_sandbox]
lab = netlab.lab_fixture()

# Drivers boot sandboxes by exec (no zygote, no pool): one sandbox each, started in about a second.
DRIVER_ENV = {"SANDLOT_ZYGOTE": "0", "SANDLOT_POOL_MIN": "0", "SANDLOT_ISOLATION": "process"}
PRELUDE = """
import json, os, sys, time
import sandlot
out = {}
CA = open(os.environ["SSL_CERT_FILE"], "rb").read()  # the lab's test CA: its HTTPS hosts' issuer
def trust_lab(sb):
    sb.files.write("/home/user/lab-ca.pem", CA)
LAB_TLS = {"SSL_CERT_FILE": "/home/user/lab-ca.pem", "CURL_CA_BUNDLE": "/home/user/lab-ca.pem",
           "PIP_CERT": "/home/user/lab-ca.pem", "GIT_SSL_CAINFO": "/home/user/lab-ca.pem",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}
FETCH = '''
import json, os, socket, urllib.request
def fetch(url, headers=None):
    try:
        req = urllib.request.Request(url, headers=headers or {})
        return urllib.request.urlopen(req, timeout=10).read().decode()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
'''
"""


def drive(lab, body: str, *, env: dict | None = None, timeout: float = 180) -> dict:
    code = PRELUDE + textwrap.dedent(body) + "\nprint('RESULT ' + json.dumps(out))\n"
    done = lab.python(code, env=dict(DRIVER_ENV, **(env or {})), timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout + done.stderr
    return json.loads(lines[-1][len("RESULT "):])


def test_no_network_unless_granted(lab):
    lab.clear_logs()
    out = drive(lab, """
        with sandlot.Sandbox() as sb:
            sb.run_code(FETCH)
            out["ip"] = sb.run_code("fetch('http://203.0.113.10/')").text
            out["name"] = sb.run_code("fetch('http://www.example.com/')").text
            out["log"] = sb.network.log()
    """)
    assert "unreachable" in out["ip"].lower() or "Errno 101" in out["ip"], out["ip"]
    assert "URLError" in out["name"], out["name"]
    assert out["log"] == [] and lab.requests() == [] and lab.queries() == []


def test_pip_install_works_with_exactly_pypi_granted_and_the_rest_is_refused_and_logged(lab):
    """The issue's first "done when": pypi.org + files.pythonhosted.org, pip install works; a git clone
    and other hosts are refused, and every decision is in the log."""
    lab.clear_logs()
    out = drive(lab, f"""
        with sandlot.Sandbox(network={{"allow": ["pypi.org", "files.pythonhosted.org"]}}, env=LAB_TLS) as sb:
            trust_lab(sb)
            pip = sb.commands.run("python3 -m pip install --isolated --no-cache-dir --disable-pip-version-check "
                                  "--index-url https://pypi.org/simple/ --target /home/user/site --retries 0 "
                                  "--timeout 10 {netlab.WHEEL_PROJECT}", timeout=120)
            out["pip"] = [pip.exit_code, pip.stderr[-600:]]
            out["value"] = sb.commands.run("PYTHONPATH=/home/user/site python3 -c "
                                           "'import {netlab.WHEEL_MODULE} as m; print(m.VALUE)'").stdout.strip()
            git = sb.commands.run("git clone -q https://git.example.com/git/project.git /home/user/clone",
                                  timeout=60)
            out["git"] = [git.exit_code, git.stderr[-300:]]
            curl = sb.commands.run("curl -sS -m 10 http://203.0.113.10/")
            out["curl_ip"] = curl.exit_code
            out["log"] = sb.network.log()
    """)
    assert out["pip"][0] == 0, out["pip"][1]
    assert out["value"] == netlab.WHEEL_VALUE
    assert out["git"][0] != 0 and "git.example.com" in out["git"][1], out["git"]
    assert out["curl_ip"] != 0
    assert {r["host"] for r in lab.requests()} == {"pypi.org", "files.pythonhosted.org"}
    assert not lab.queries(name="git.example.com")  # a name not granted is never asked upstream
    seen = {(e["kind"], e["name"] or e["address"], e["verdict"]) for e in out["log"]}
    assert ("tcp", "pypi.org", "allow") in seen and ("tcp", "files.pythonhosted.org", "allow") in seen
    assert ("dns", "git.example.com", "deny") in seen and ("tcp", "203.0.113.10", "deny") in seen
    for entry in out["log"]:
        assert {"time", "kind", "name", "address", "port", "verdict", "rule"} <= set(entry)


def test_public_reaches_public_hosts_but_never_private_metadata_or_rebinding(lab):
    lab.clear_logs()
    out = drive(lab, """
        with sandlot.Sandbox(network="public") as sb:
            sb.run_code(FETCH)
            out["web"] = sb.run_code("fetch('http://www.example.com/')").text
            out["private_ip"] = sb.run_code("fetch('http://10.0.0.5/')").text
            out["metadata_ip"] = sb.run_code("fetch('http://169.254.169.254/latest/meta-data/')").text
            out["metadata_v6"] = sb.run_code("fetch('http://[::ffff:169.254.169.254]/')").text
            out["rebinding"] = sb.run_code("fetch('http://metadata.example.com/')").text
            out["udp"] = sb.run_code(
                "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\\n"
                "s.sendto(b'quic?', ('203.0.113.10', 443))\\n"
                "try:\\n    s.recv(10); r = 'answered'\\nexcept OSError as e:\\n    r = type(e).__name__\\nr").text
    """)
    assert "hello from 203.0.113.10 (www.example.com)" in out["web"]
    for key in ("private_ip", "metadata_ip", "metadata_v6", "rebinding"):
        assert "hello" not in out[key] and ("Error" in out[key] or "reset" in out[key].lower()), (key, out[key])
    assert out["udp"] != "'answered'" and not lab.udp_packets()
    hosts = {r["host"] for r in lab.requests()}
    assert hosts == {"www.example.com"}, hosts  # nothing reached the private or metadata hosts


def test_live_update_cuts_an_open_stream_and_refuses_new_connections(lab):
    out = drive(lab, """
        with sandlot.Sandbox(network={"allow": ["www.example.com"]}) as sb:
            stream = sb.commands.run("curl -sS -N -m 30 http://www.example.com/stream", background=True)
            deadline = time.time() + 15
            while "line" not in stream.stdout and time.time() < deadline:
                time.sleep(0.1)
            out["before"] = stream.stdout.count("\\n")
            started = time.time()
            out["policy"] = sb.network.update(allow=[])
            result = stream.wait()
            out["cut_after"] = time.time() - started
            out["curl_exit"] = result.exit_code
            out["again"] = sb.commands.run("curl -sS -m 5 http://www.example.com/").exit_code
            out["verdicts"] = [e["verdict"] for e in sb.network.log()]
    """)
    assert out["before"] >= 1
    assert out["policy"] == {"allow": [], "deny": []}
    assert out["cut_after"] < 5 and out["curl_exit"] != 0  # cut, not left to run its 60 s
    assert out["again"] != 0 and "revoked" in out["verdicts"]


def test_a_secret_reaches_only_its_host_and_never_the_sandbox(lab):
    """The issue's second "done when": an API key the code can use and never read."""
    lab.clear_logs()
    out = drive(lab, """
        secret = "sk-real-value-0123456789"
        with sandlot.Sandbox(secrets={"API_KEY": {"value": secret, "hosts": ["api.example.com"]}},
                             network={"allow": ["www.example.com"]}) as sb:
            sb.run_code(FETCH)
            out["env"] = sb.run_code("import os; os.environ['API_KEY']").text
            out["api"] = sb.run_code(
                "fetch('https://api.example.com/v1', {'Authorization': 'Bearer ' + os.environ['API_KEY']})").text
            out["elsewhere"] = sb.run_code(
                "fetch('https://www.example.com/', {'Authorization': 'Bearer ' + os.environ['API_KEY']})").text
            out["in_url"] = sb.run_code("fetch('https://api.example.com/?k=' + os.environ['API_KEY'])").text
            found = sb.commands.run("grep -rl " + secret + " /proc/self/environ /proc/1/environ /home /tmp /etc "
                                    "2>/dev/null; cat /proc/*/environ 2>/dev/null | grep -c " + secret)
            out["found"] = found.stdout
            out["curl"] = sb.commands.run('curl -sS -m 10 -H "Authorization: Bearer $API_KEY" '
                                          'https://api.example.com/curl').stdout
    """, env={"SSL_CERT_FILE": str(lab.ca_path)})
    assert out["env"].strip("'").startswith("SANDLOT_SECRET_")
    assert "hello from" in out["api"] and "hello from" in out["curl"], out
    api = [r for r in lab.requests() if r["host"] == "api.example.com"]
    assert [r["headers"].get("authorization") for r in api] == ["Bearer sk-real-value-0123456789"] * 2
    www = [r for r in lab.requests() if r["host"] == "www.example.com"]
    assert www and all("sk-real" not in repr(r) for r in www)  # another host gets the placeholder, never the value
    assert "403" in out["in_url"] and not [r for r in api if "?k=" in r["path"]]
    assert out["found"].strip() in ("0", "")


def test_a_bad_network_rule_is_refused_clearly():
    with pytest.raises(sandlot.InvalidRequest, match="network rule"):
        sandlot.Sandbox(network={"allow": ["exa mple.com"]}, api_url="")
    # Host sockets and the broker do not survive a checkpoint: a sandbox with a network is never paused.
    with pytest.raises(sandlot.InvalidRequest, match="on_idle='pause' cannot keep a network"):
        sandlot.Sandbox(isolation="gvisor", network="public", on_idle="pause", api_url="")


# -- the gVisor tier: runsc --network=host inside a namespace made for the sandbox ----------------------
needs_runsc = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc (Debian package `runsc`) is not installed")
RUNSC_FACTS = '''
def runsc_facts(sb):
    """How runsc runs this sandbox, read from /proc: the `run` command's network flag, and the network
    namespaces of its sentry (`boot`) next to this driver's (the lab: the "host" of these tests)."""
    sid, facts = sb.sandbox_id, {"network_flag": [], "sentry_netns": []}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = [a.decode() for a in open(f"/proc/{pid}/cmdline", "rb").read().split(bytes(1)) if a]
            netns = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue
        if not argv or sid not in argv or "runsc" not in argv[0]:
            continue
        if "run" in argv:
            facts["network_flag"] += [a for a in argv if a.startswith("--network")]
        if "boot" in argv:
            facts["sentry_netns"].append(netns)
    facts["driver_netns"] = os.stat("/proc/self/ns/net").st_ino
    return facts
'''
# A DNS query for git.example.com (A), sent straight to the internet's resolver by the code.
GIT_QUERY = "abcd0100000100000000000003676974076578616d706c6503636f6d0000010001"


@needs_runsc
def test_gvisor_without_a_network_has_none_and_a_network_create_never_takes_a_warm_one(lab):
    """A gVisor sandbox without a network runs with --network=none (gVisor's own netstack: loopback only);
    a warm one (pooled, network=none) is never handed to a create that asks for a network."""
    lab.clear_logs()
    out = drive(lab, RUNSC_FACTS + textwrap.dedent("""
        from sandlot._engine import default_engine
        sandlot.configure_pool("python", min_ready=1)
        started = time.monotonic()
        with sandlot.Sandbox(isolation="gvisor") as sb:
            out["boot"] = time.monotonic() - started
            out["facts"] = runsc_facts(sb)
            sb.run_code(FETCH)
            out["ip"] = sb.run_code("fetch('http://203.0.113.10/')").text
            out["name"] = sb.run_code("fetch('http://www.example.com/')").text
            try:
                out["late"] = sb.network.update(allow=["www.example.com"])
            except sandlot.InvalidRequest as exc:
                out["late"] = str(exc)
            out["name_after"] = sb.run_code("fetch('http://www.example.com/')").text
        deadline = time.time() + 120
        while not default_engine().pools.ready(isolation="gvisor") and time.time() < deadline:
            time.sleep(0.2)
        out["warm"] = [s.id for s in default_engine().pools.ready(isolation="gvisor")]
        with sandlot.Sandbox(isolation="gvisor", network={"allow": []}) as nsb:
            out["net_id"] = nsb.sandbox_id
            out["net_facts"] = runsc_facts(nsb)
        out["warm_after"] = [s.id for s in default_engine().pools.ready(isolation="gvisor")]
    """), env={"SANDLOT_POOL_MIN": "1"})
    print("gVisor boot without network: %.2f s" % out["boot"])
    facts = out["facts"]
    assert facts["network_flag"] == ["--network=none"], facts
    assert facts["sentry_netns"] and facts["driver_netns"] not in facts["sentry_netns"], facts
    assert "hello" not in out["ip"] and "URLError" in out["name"], out
    # runsc's network mode is fixed at boot: no network added later (the process tier can).
    assert "only at create" in out["late"] and "URLError" in out["name_after"], out
    assert lab.requests() == [] and lab.queries() == []
    assert len(out["warm"]) == 1 and out["warm_after"] == out["warm"] and out["net_id"] not in out["warm"], out
    assert out["net_facts"]["network_flag"] == ["--network=host"], out["net_facts"]


@needs_runsc
def test_gvisor_network_grants_exactly_the_policy_and_secrets_and_the_code_cannot_touch_it(lab):
    """One gVisor sandbox (each boot is seconds under ptrace): an allowed name works, a denied one is
    refused (never asked upstream, even sent to a resolver directly) and logged, private and metadata
    addresses are refused, a secret is substituted for its host, ip/nft/raw sockets inside change
    nothing, and a live update cuts an open stream."""
    lab.clear_logs()
    out = drive(lab, RUNSC_FACTS + textwrap.dedent(f"""
        secret = "sk-real-value-0123456789"
        started = time.monotonic()
        with sandlot.Sandbox(isolation="gvisor", network={{"allow": ["www.example.com"]}},
                             secrets={{"API_KEY": {{"value": secret, "hosts": ["api.example.com"]}}}}) as sb:
            out["boot"] = time.monotonic() - started
            out["facts"] = runsc_facts(sb)
            sb.run_code(FETCH)
            out["web"] = sb.run_code("fetch('http://www.example.com/')").text
            out["denied"] = sb.run_code("fetch('http://git.example.com/')").text
            out["private"] = sb.run_code("fetch('http://10.0.0.5/')").text
            out["metadata"] = sb.run_code("fetch('http://169.254.169.254/latest/meta-data/')").text
            out["direct_dns"] = sb.run_code(
                "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\\n"
                "s.sendto(bytes.fromhex('{GIT_QUERY}'), ('192.0.2.53', 53))\\n"
                "s.recv(512).hex()").text
            out["env"] = sb.run_code("import os; os.environ['API_KEY']").text
            out["api"] = sb.run_code(
                "fetch('https://api.example.com/v1', {{'Authorization': 'Bearer ' + os.environ['API_KEY']}})").text
            out["tamper"] = sb.commands.run(
                "ip route add 10.0.0.0/8 dev lo 2>&1; echo ip=$?; nft flush ruleset 2>&1; echo nft=$?; "
                "ip link set lo down 2>&1; echo down=$?; "
                "python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)' "
                "2>&1 | tail -1", env={{"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"}}).stdout
            out["private_after"] = sb.run_code("fetch('http://10.0.0.5/')").text
            out["web_after"] = sb.run_code("fetch('http://www.example.com/')").text
            try:
                out["pause"] = repr(sb.pause())
            except sandlot.InvalidRequest as exc:
                out["pause"] = str(exc)
            stream = sb.commands.run("curl -sS -N -m 30 http://www.example.com/stream", background=True)
            deadline = time.time() + 20
            while "tick" not in stream.stdout and time.time() < deadline:
                time.sleep(0.1)
            out["before"] = stream.stdout.count("tick")
            cut = time.time()
            sb.network.update(allow=[])
            out["curl_exit"] = stream.wait().exit_code
            out["cut_after"] = time.time() - cut
            out["log"] = sb.network.log()
        # Killed: nothing is left in its namespace (runsc, the sentry, the holder), so the namespace is gone.
        netns = set(out["facts"]["sentry_netns"])
        deadline = time.time() + 15
        while time.time() < deadline:
            out["left"] = [p for p in filter(str.isdigit, os.listdir("/proc"))
                           if os.path.exists(f"/proc/{{p}}/ns/net") and os.stat(f"/proc/{{p}}/ns/net").st_ino in netns]
            if not out["left"]:
                break
            time.sleep(0.2)
    """), env={"SSL_CERT_FILE": str(lab.ca_path)})
    print("gVisor boot with network (and secrets): %.2f s" % out["boot"])
    facts = out["facts"]
    assert facts["network_flag"] == ["--network=host"], facts
    sentry = set(facts["sentry_netns"])
    assert sentry and facts["driver_netns"] not in sentry and os.stat("/proc/self/ns/net").st_ino not in sentry, facts
    assert "hello from 203.0.113.10 (www.example.com)" in out["web"], out["web"]
    assert "hello" not in out["denied"] and "Error" in out["denied"], out["denied"]
    for key in ("private", "metadata", "private_after"):
        assert "hello" not in out[key] and ("Error" in out[key] or "reset" in out[key].lower()), (key, out[key])
    assert out["env"].strip("'").startswith("SANDLOT_SECRET_")
    assert "hello from" in out["api"], out["api"]
    api = [r for r in lab.requests() if r["host"] == "api.example.com"]
    assert [r["headers"].get("authorization") for r in api] == ["Bearer sk-real-value-0123456789"]
    tamper = out["tamper"]
    assert "ip=0" not in tamper and "nft=0" not in tamper and "down=0" not in tamper, tamper
    assert tamper.rstrip().splitlines()[-1].startswith(("PermissionError", "OSError")), tamper  # no raw socket
    assert "hello from" in out["web_after"]
    assert "cannot be paused" in out["pause"], out["pause"]
    assert out["before"] >= 1 and out["curl_exit"] != 0 and out["cut_after"] < 5, out
    seen = {(e["kind"], e["name"] or e["address"], e["verdict"]) for e in out["log"]}
    assert ("dns", "git.example.com", "deny") in seen and ("tcp", "www.example.com", "allow") in seen, seen
    assert ("tcp", "10.0.0.5", "deny") in seen and ("tcp", "169.254.169.254", "deny") in seen, seen
    assert "revoked" in {e["verdict"] for e in out["log"]}
    assert not lab.queries(name="git.example.com")  # neither through our DNS nor sent to 192.0.2.53 directly
    answer = bytes.fromhex(out["direct_dns"].strip("'"))  # the query sent to 192.0.2.53 met the broker instead
    assert answer[:2] == bytes.fromhex("abcd") and answer[3] & 0xF == 3, out["direct_dns"]  # NXDOMAIN
    assert {r["host"] for r in lab.requests()} == {"www.example.com", "api.example.com"}
    assert out["left"] == [], out["left"]


SERVER_DRIVER = """
import subprocess
from sandlot.server.store import create_key
db = os.environ["LAB_DB"]
key = create_key("netlab", db)
port = int(os.environ["LAB_PORT"])
flags = os.environ.get("LAB_SERVER_FLAGS", "").split()
import httpx
url = f"http://127.0.0.1:{port}"
def start_server(flags):
    started = subprocess.Popen([sys.executable, "-m", "sandlot.server", "--port", str(port), "--db", db,
                                "--log-level", "warning"] + flags)
    for _ in range(600):
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    return started
server = start_server(flags)
try:
"""


def _server_drive(lab, tmp_path, body: str, flags: str) -> dict:
    from .serverproc import free_port

    indented = textwrap.indent(textwrap.dedent(body), "    ")
    code = SERVER_DRIVER + indented + "\nfinally:\n    server.terminate(); server.wait(30)\n"
    return drive(lab, code, env={"LAB_DB": str(tmp_path / "sandlot.db"), "LAB_PORT": str(free_port()),
                                 "LAB_SERVER_FLAGS": flags})


def test_through_a_server_the_same_api_and_the_operator_decides(lab, tmp_path):
    lab.clear_logs()
    out = _server_drive(lab, tmp_path, """
        with sandlot.Sandbox(network={"allow": ["www.example.com"]}, api_url=url, api_key=key) as sb:
            sb.run_code(FETCH)
            out["web"] = sb.run_code("fetch('http://www.example.com/')").text
            out["other"] = sb.run_code("fetch('http://api.example.com/')").text
            out["policy"] = sb.network.update(allow=["www.example.com", "api.example.com"])
            out["other_after"] = sb.run_code("fetch('http://api.example.com/')").text
            out["log"] = sb.network.log()
            m = sb.metrics()
            out["metrics"] = [m.network_allowed, m.network_bytes_in, m.network_bytes_out]
    """, "--allow-network")
    assert "hello from" in out["web"] and "hello from" not in out["other"]
    assert out["policy"]["allow"] == ["www.example.com", "api.example.com"]
    assert "hello from" in out["other_after"]
    assert ("dns", "api.example.com", "deny") in {(e["kind"], e["name"], e["verdict"]) for e in out["log"]}
    allowed, bytes_in, bytes_out = out["metrics"]  # per sandbox, from its broker's counters
    assert allowed == 2 and bytes_in > 50 and bytes_out > 50


def test_a_sandbox_with_a_network_policy_outlives_its_server_and_keeps_its_rules(lab, tmp_path):
    """Killed -9 and started again, the server serves the sandbox's network anew: the rules in force (as
    updated before the crash) still grant exactly what they did."""
    lab.clear_logs()
    out = _server_drive(lab, tmp_path, """
        sb = sandlot.Sandbox(network={"allow": ["www.example.com"]}, api_url=url, api_key=key)
        sb.run_code(FETCH)
        sb.network.update(allow=["www.example.com", "api.example.com"], deny=["www.example.com"])
        out["before"] = sb.run_code("fetch('http://api.example.com/')").text
        server.kill(); server.wait()
        server = start_server(flags)
        again = sandlot.Sandbox.connect(sb.sandbox_id, api_url=url, api_key=key)
        out["api"] = again.run_code("fetch('http://api.example.com/')").text
        out["www"] = again.run_code("fetch('http://www.example.com/')").text
        out["git"] = again.run_code("fetch('http://git.example.com/')").text
        out["log"] = again.network.log()
        again.kill()
    """, "--allow-network")
    assert "hello from" in out["before"] and "hello from" in out["api"], out
    assert "hello from" not in out["www"] and "hello from" not in out["git"], out  # denied, and never granted
    seen = {(e["kind"], e["name"], e["verdict"]) for e in out["log"]}  # the new server's broker decided
    assert ("dns", "api.example.com", "allow") in seen and ("dns", "git.example.com", "deny") in seen, seen


def test_a_server_without_allow_network_refuses_it(lab, tmp_path):
    out = _server_drive(lab, tmp_path, """
        try:
            sandlot.Sandbox(network="public", api_url=url, api_key=key)
            out["refused"] = None
        except sandlot.InvalidRequest as exc:
            out["refused"] = str(exc)
    """, "")
    assert out["refused"] and "--allow-network" in out["refused"]


# -- get_url: the owner reaches a server the code started --------------------------------------------
SERVE = ("mkdir -p /tmp/site && echo hi-from-the-sandbox > /tmp/site/index.html && "
         "cd /tmp/site && exec python3 -m http.server 8000 --bind 127.0.0.1")


def test_get_url_reaches_a_server_the_code_started_and_nothing_else():
    import urllib.error
    import urllib.request

    with sandlot.Sandbox(api_url="") as sb, sandlot.Sandbox(api_url="") as other:
        sb.commands.run(SERVE, background=True)
        url = sb.get_url(8000)
        assert url.startswith("http://127.0.0.1:") and sb.get_url(8000) == url
        assert http_body_once_up(url + "index.html") == b"hi-from-the-sandbox\n"
        # Another sandbox's port 8000 is its own (nothing listens there): 502, never the first one's.
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(other.get_url(8000), timeout=5)
        assert info.value.code == 502
        # get_url is ingress for the owner only: the sandbox still has no egress.
        assert "Errno" in sb.run_code(
            "import socket\ntry:\n    socket.create_connection(('203.0.113.10', 80), 2); r = 'connected'\n"
            "except OSError as e:\n    r = str(e)\nr").text
        with pytest.raises(sandlot.InvalidRequest, match="port must be"):
            sb.get_url(70000)
    with pytest.raises(OSError):  # the listener ends with the sandbox
        urllib.request.urlopen(url, timeout=5)


def test_get_url_through_a_server_needs_the_tenants_key(lab, tmp_path):
    out = _server_drive(lab, tmp_path, f"""
        import urllib.request, urllib.error
        with sandlot.Sandbox(api_url=url, api_key=key) as sb:
            sb.commands.run({SERVE!r}, background=True)
            port_url = sb.get_url(8000)
            out["url"] = port_url
            for _ in range(100):
                try:
                    req = urllib.request.Request(port_url + "index.html", headers={{"Authorization": "Bearer " + key}})
                    out["body"] = urllib.request.urlopen(req, timeout=5).read().decode()
                    break
                except urllib.error.HTTPError as exc:
                    out["body"] = exc.code
                    time.sleep(0.2)
            try:
                urllib.request.urlopen(port_url + "index.html", timeout=5)
                out["anonymous"] = "served"
            except urllib.error.HTTPError as exc:
                out["anonymous"] = exc.code
    """, "")
    assert "/ports/8000/" in out["url"] and out["body"] == "hi-from-the-sandbox\n", out
    assert out["anonymous"] == 401


def test_the_operator_bounds_the_rules_tenants_may_ask_for(lab, tmp_path):
    out = _server_drive(lab, tmp_path, """
        import httpx
        info = httpx.get(url + "/v1/info", headers={"Authorization": "Bearer " + key}).json()
        out["info"] = info["network"]
        def refused(**kwargs):
            try:
                sandlot.Sandbox(api_url=url, api_key=key, **kwargs).kill()
                return None
            except sandlot.InvalidRequest as exc:
                return str(exc)
        out["wide"] = refused(network="public")
        out["other"] = refused(network={"allow": ["api.example.com"]})
        out["secret"] = refused(secrets={"K": {"value": "v", "hosts": ["api.example.com"]}})
        with sandlot.Sandbox(network={"allow": ["www.example.com:443", "files.pythonhosted.org"]}, api_url=url,
                             api_key=key) as sb:
            try:
                sb.network.update(allow=["api.example.com"])
                out["update"] = None
            except sandlot.InvalidRequest as exc:
                out["update"] = str(exc)
            out["kept"] = sb.network.update(deny=["files.pythonhosted.org"])
    """, "--network-allow www.example.com --network-allow *.pythonhosted.org")
    assert out["info"] == {"allowed": True, "within": ["www.example.com", "*.pythonhosted.org"]}
    for key in ("wide", "other", "secret", "update"):
        assert out[key] and "beyond what this server grants" in out[key], (key, out[key])
    assert "'*'" in out["wide"] and "'api.example.com'" in out["other"] and "'api.example.com:443'" in out["secret"]
    assert out["kept"] == {"allow": ["www.example.com:443", "files.pythonhosted.org"],
                           "deny": ["files.pythonhosted.org"]}


def test_the_cli_grants_exactly_what_its_flags_say(lab):
    import sys

    lab.clear_logs()
    code = ("import urllib.request as u\n"
            "for url in ('http://www.example.com/', 'http://api.example.com/'):\n"
            "    try:\n        print(url, u.urlopen(url, timeout=5).read().decode().strip())\n"
            "    except Exception as e:\n        print(url, 'refused', type(e).__name__)\n")
    done = lab.run([sys.executable, "-m", "sandlot.cli", "run", "--allow", "www.example.com", code],
                   env=DRIVER_ENV, timeout=120)
    assert "http://www.example.com/ hello from 203.0.113.10 (www.example.com)" in done.stdout, done.stdout
    assert "http://api.example.com/ refused" in done.stdout
    bad = lab.run([sys.executable, "-m", "sandlot.cli", "run", "--allow", "exa mple.com", "1"], env=DRIVER_ENV,
                  check=False)
    assert bad.returncode == 2 and "network rule 'exa mple.com'" in bad.stderr
    secret = lab.run([sys.executable, "-m", "sandlot.cli", "run", "--secret", "K=v@api.example.com",
                      "import os; print(os.environ['K'][:15])"], env=DRIVER_ENV, timeout=120)
    assert "SANDLOT_SECRET_" in secret.stdout


async def test_an_mcp_agent_cannot_grant_itself_a_network_unless_its_operator_allows():
    from sandlot.mcp_server import LocalSandboxes

    with pytest.raises(sandlot.InvalidRequest, match="sandlot mcp --allow-network"):
        await LocalSandboxes(api_url="").create(None, one_shot=False, network="public")
    allowed = LocalSandboxes(api_url="", allow_network=True)
    sandbox = await allowed.create(None, one_shot=False, network={"allow": ["www.example.com"]})
    try:
        assert (await sandbox.network.log()) == [] and sandbox.is_running  # attached, nothing asked yet
        # Nothing is resolved without the sandbox asking: no packet left this test's namespace.
    finally:
        await sandbox.kill()
        await allowed.aclose()


def test_requests_httpx_and_a_coalesced_request_for_another_host_stay_on_the_granted_name(lab):
    """Python's usual clients work as they are (no proxy settings). A request for another host sent inside
    TLS to a granted name (as HTTP/2 connection coalescing would) can only reach the granted name's
    address: the host dialled the name the SNI named, whatever the encrypted request says."""
    lab.clear_logs()
    out = drive(lab, """
        with sandlot.Sandbox(network={"allow": ["www.example.com"]}, env=LAB_TLS) as sb:
            trust_lab(sb)
            out["requests"] = sb.run_code(
                "import requests; requests.get('https://www.example.com/r', timeout=10).text").text
            out["httpx"] = sb.run_code("import httpx; httpx.get('https://www.example.com/h', timeout=10).text").text
            out["requests_denied"] = sb.run_code(
                "try:\\n    requests.get('https://api.example.com/', timeout=5); r = 'reached'\\n"
                "except Exception as e:\\n    r = type(e).__name__\\nr").text
            out["coalesced"] = sb.run_code(
                "import socket, ssl\\n"
                "ctx = ssl.create_default_context(cafile='/home/user/lab-ca.pem')\\n"
                "s = ctx.wrap_socket(socket.create_connection(('www.example.com', 443), 10),"
                " server_hostname='www.example.com')\\n"
                "s.sendall(b'GET /coalesced HTTP/1.1\\\\r\\\\nHost: api.example.com\\\\r\\\\nConnection: close\\\\r\\\\n\\\\r\\\\n')\\n"
                "s.recv(200).decode(errors='replace')").text
    """)
    assert "hello from 203.0.113.10 (www.example.com)" in out["requests"]
    assert "hello from 203.0.113.10 (www.example.com)" in out["httpx"]
    assert out["requests_denied"] != "'reached'"
    assert "HTTP/1." in out["coalesced"]
    coalesced = lab.requests(path="/coalesced")
    assert [r["server"] for r in coalesced] == [netlab.WEB_V4]  # www's address, never api's
    assert not lab.requests(server=netlab.API_V4) and not lab.queries(name="api.example.com")
