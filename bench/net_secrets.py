"""What secrets interception costs: CA and leaf minting, and HTTPS through the interceptor vs direct.

    .venv/bin/python bench/net_secrets.py          # ~20 s on loopback, prints a table (--json FILE too)

Everything runs on loopback with the harness of tests/test_net_secrets.py (an upstream HTTPS server with
a test CA, the interceptor on an asyncio loop in a thread). "direct" is the same client talking to the
same upstream without the interceptor, so the difference is the interceptor's cost (a second TLS
session, h11 parsing and re-framing, the substitution).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandlot._net.secrets import SecretSet  # noqa: E402
from sandlot._net.tls import SandboxCA, make_upstream_context  # noqa: E402
from tests.test_net_secrets import API, API_KEY, BIG, Interceptor, Upstream, _test_ca  # noqa: E402


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def _serve_upstream(cert, key, port_queue) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    upstream = Upstream(server_ctx)
    port_queue.put(upstream.port)
    upstream.serve_forever()


def _serve_interceptor(secrets, ca, upstream_port, upstream_ca, port_queue) -> None:
    loop = asyncio.new_event_loop()
    it = Interceptor(loop, sni=API, secrets=secrets, ca=ca, upstream_port=upstream_port,
                     upstream_ssl=make_upstream_context(upstream_ca), start=False)
    port_queue.put(it.port)
    loop.run_forever()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    results: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-secrets-"))

    hosts = ["api.example.test", "*.example.org"]
    results["ca_create_ms"] = _median_ms(lambda: SandboxCA.create(hosts), 50)
    ca = SandboxCA.create(hosts)
    counter = iter(range(10**6))
    results["leaf_mint_ms"] = _median_ms(lambda: ca.leaf_for(f"h{next(counter)}.example.org"), 50)
    results["leaf_and_server_context_ms"] = _median_ms(
        lambda: ca.server_context(f"h{next(counter)}.example.org"), 50)
    results["leaf_cached_us"] = _median_ms(lambda: ca.server_context(API), 1000) * 1000
    results["bundle_write_ms"] = _median_ms(lambda: ca.bundle(tmp / "bundle.pem"), 20)
    results["upstream_context_ms"] = _median_ms(make_upstream_context, 5)

    ca_pem, cert, key = _test_ca(tmp)
    secrets = SecretSet.build({"API_KEY": {"value": API_KEY, "hosts": [API]}})
    sandbox_ca = SandboxCA.create(secrets.hosts)
    bundle = sandbox_ca.bundle(tmp / "sandbox.pem")
    # Three processes, as in real use: the upstream, the interceptor (the broker's side), the client.
    ctx = multiprocessing.get_context("fork")
    up_port, it_port = ctx.Queue(), ctx.Queue()
    up_proc = ctx.Process(target=_serve_upstream, args=(cert, key, up_port), daemon=True)
    up_proc.start()
    upstream_port = up_port.get(timeout=30)
    it_proc = ctx.Process(target=_serve_interceptor, daemon=True,
                          args=(secrets, sandbox_ca, upstream_port, ca_pem, it_port))
    it_proc.start()
    intercept_port = it_port.get(timeout=30)

    through_ctx = ssl.create_default_context(cafile=str(bundle))
    direct_ctx = ssl.create_default_context(cafile=str(ca_pem))
    header = {"Authorization": "Bearer " + secrets.placeholders()["API_KEY"]}

    def connection(port: int, ctx: ssl.SSLContext) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(API, port, timeout=30)
        conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname=API)
        return conn

    def get(conn, path="/x") -> bytes:
        conn.request("GET", path, headers=header)
        return conn.getresponse().read()

    try:
        for label, port, ctx, cafile in (("direct", upstream_port, direct_ctx, ca_pem),
                                         ("intercepted", intercept_port, through_ctx, bundle)):
            def fresh(port=port, ctx=ctx):
                conn = connection(port, ctx)
                get(conn)
                conn.close()
            results[f"{label}_new_connection_get_ms"] = _median_ms(fresh, 100)
            conn = connection(port, ctx)
            get(conn)
            results[f"{label}_keepalive_get_ms"] = _median_ms(lambda conn=conn: get(conn), 300)
            conn.close()
            # Throughput with curl as the client (C, its own process): 10 x 5 MiB on one connection.
            url = f"https://{API}:{port}/big-cl"
            t = time.perf_counter()
            out = subprocess.run(["curl", "-sS", "--resolve", f"{API}:{port}:127.0.0.1",
                                  "-w", "%{size_download}\\n"] + ["-o", "/dev/null", url] * 10,
                                 env={"PATH": os.environ["PATH"], "CURL_CA_BUNDLE": str(cafile)},
                                 capture_output=True, text=True, check=True)
            elapsed = time.perf_counter() - t
            assert sum(int(x) for x in out.stdout.split()) == 10 * BIG, out.stdout
            results[f"{label}_download_MBps"] = 10 * BIG / elapsed / 1e6
    finally:
        up_proc.kill()
        it_proc.kill()

    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
