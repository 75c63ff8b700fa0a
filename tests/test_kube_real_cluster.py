"""The kubernetes tier on a real cluster: runs only where KUBECONFIG names one.

The cluster must have the agent-sandbox controller, runsc on its nodes and Sandlot's manifests applied
(`sandlot kube manifests ... | kubectl apply -f -`, README "Running on Kubernetes"); SANDLOT_KUBE_NAMESPACE names
their namespace when the kubeconfig's context does not. Nothing here runs on the emulated cluster.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

import sandlot
from sandlot._backends import kubernetes as kube
from sandlot._engine import default_engine

pytestmark = pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="no real cluster: set KUBECONFIG to a "
                                "cluster with agent-sandbox, runsc and Sandlot's manifests applied to run this test")


async def test_a_sandbox_on_a_real_cluster_runs_under_gvisor_and_its_claim_goes_with_it():
    pytest.importorskip("kubernetes_asyncio", reason="the tier's client: pip install 'sandlot[kubernetes]'")
    async with sandlot.AsyncSandbox(isolation="kubernetes", api_url="") as sb:
        execution = await sb.run_code("import os, platform\nprint(os.getuid(), platform.release())")
        assert execution.error is None, execution.error
        uid, release = execution.logs.stdout[0].split()
        assert uid == "1000"
        assert release.startswith("4.4.0")  # what gVisor's sentry reports as its kernel, whatever the node runs
        r = await sb.commands.run("cat /var/run/secrets/kubernetes.io/serviceaccount/token")
        assert r.exit_code != 0  # no service-account token in a sandbox's pod
        name = kube.claim_name(sb.sandbox_id)
        backend = default_engine().backend("kubernetes")
        cluster = await backend.cluster()
        assert await cluster.get_claim(name) is not None
    deadline = time.monotonic() + 60
    while await cluster.get_claim(name) is not None:
        assert time.monotonic() < deadline, f"claim {name} still there a minute after the kill"
        await asyncio.sleep(1)


async def test_get_url_reaches_a_server_in_the_pod_over_the_pod_network():
    """Reached as the holder is (this process must reach pod addresses, as the server's pods do)."""
    import urllib.error
    import urllib.request

    pytest.importorskip("kubernetes_asyncio", reason="the tier's client: pip install 'sandlot[kubernetes]'")

    def get(url: str, within: float) -> "bytes | int":
        deadline = time.monotonic() + within
        while True:
            try:
                return urllib.request.urlopen(url, timeout=10).read()
            except urllib.error.HTTPError as exc:
                if time.monotonic() > deadline:
                    return exc.code
                time.sleep(0.5)

    async with sandlot.AsyncSandbox(isolation="kubernetes", api_url="") as sb:
        await sb.commands.run("mkdir -p /tmp/site && cd /tmp/site && echo hi-from-the-pod > index.html && "
                              "exec python3 -m http.server 8000 --bind 0.0.0.0", background=True)
        url = await sb.get_url(8000)
        assert await asyncio.to_thread(get, url + "index.html", 30) == b"hi-from-the-pod\n"
        assert await asyncio.to_thread(get, await sb.get_url(8002), 0) == 502  # nothing listens there
