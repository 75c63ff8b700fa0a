"""The kubernetes tier on the emulated cluster (tests/kube_cluster.py: each pod a local process-tier sandbox running
Sandlot's pod holder), against the process tier in the same run.

    .venv/bin/python bench/kube_tier.py            # needs the test extras (kmock, kubernetes_asyncio)
    NO_REFRESH=1 .venv/bin/python bench/kube_tier.py   # without the per-call pod_usage round trips

Prints the create-to-ready time (claim, pod boot, bind, agent boot; p50 of 5) and the warm round trip of
run_code("1") (2 x 60 calls, interleaved by rounds: p50 and p95) on both tiers. On a real cluster the pod
network replaces the test's two loopback forwarders.
"""
import asyncio, os, statistics, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sandlot
from tests.kube_cluster import KubeCluster


async def calls(sb, n=60):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await sb.run_code("1")
        out.append((time.perf_counter() - t) * 1000)
    return out


async def main():
    async with KubeCluster() as cluster:
        await cluster.apply_template("python")
        os.environ["KUBECONFIG"] = cluster.kubeconfig
        os.environ["SANDLOT_KUBE_NAMESPACE"] = cluster.namespace
        creates = []
        for _ in range(5):
            t = time.perf_counter()
            sb = await sandlot.AsyncSandbox.create(isolation="kubernetes", api_url="")
            creates.append((time.perf_counter() - t) * 1000)
            await sb.kill()
        async with sandlot.AsyncSandbox(isolation="kubernetes", api_url="") as kube, \
                sandlot.AsyncSandbox(isolation="process", api_url="") as proc:
            for _ in range(2):
                k, p = await calls(kube), await calls(proc)
            k.sort(); p.sort()
            q = lambda xs, f: xs[int(f * (len(xs) - 1))]
            print(f"create->ready (claim, emulated pod boot, bind, agent boot): p50 {statistics.median(creates):.0f} ms")
            print(f"warm run_code('1'): kubernetes p50 {q(k,.5):.2f} p95 {q(k,.95):.2f} ms; process p50 {q(p,.5):.2f} p95 {q(p,.95):.2f} ms")


if os.environ.get("NO_REFRESH"):
    from sandlot._backends.kubernetes import KubernetesSandbox
    async def _none(self, **kw): return None
    KubernetesSandbox.refresh_usage = _none
asyncio.run(main())
