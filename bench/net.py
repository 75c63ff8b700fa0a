"""Network bench (issue #13): connect latency and throughput through a sandbox's broker vs direct.

    sudo .venv/bin/python bench/net.py [--connects 300] [--megabytes 200]

Everything runs in the test lab (tests/netlab.py), offline. A server runs in the lab namespace (which
stands for the host) on the lab's own address; the same client program connects to it
  direct       from the lab namespace itself (what the host's own connections cost), and
  broker-ip    from a configured sandbox-like namespace, dialling the IP literal (policy: an IP rule),
  broker-name  from that namespace, dialling a name resolved through the broker's DNS (synthetic address;
               the client's first bytes, an HTTP head naming the host, are checked against the name).
Latency is connect + one small HTTP request/response + close (p50/p95 over --connects); throughput is
--megabytes sent (upload) and received (download) on one connection. Server, broker and client are three
processes (the broker: this one, on a thread in the lab namespace), so one does not steal the others' GIL.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PORT = 9000
NAME = "bench.example.com"


# -- the two small programs: server (in the lab) and client (lab or sandbox namespace) -----------------------

def serve(host: str) -> None:
    import socketserver

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock = self.request
            head = b""
            while b"\n" not in head:
                more = sock.recv(65536)
                if not more:
                    return
                head += more
            if head.startswith(b"GET "):
                while b"\r\n\r\n" not in head:
                    head += sock.recv(65536)
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                return
            command, _, rest = head.partition(b"\n")
            verb, size = command.split()
            size = int(size)
            if verb == b"put":
                got = len(rest)
                buffer = bytearray(1 << 20)
                while got < size:
                    n = sock.recv_into(buffer)
                    if not n:
                        return
                    got += n
                sock.sendall(b"done")
            elif verb == b"get":
                block = memoryview(b"x" * (1 << 20))
                sent = 0
                while sent < size:
                    n = min(len(block), size - sent)
                    sock.sendall(block[:n])  # a memoryview slice: no copy
                    sent += n

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    with Server((host, PORT), Handler) as server:
        print("ready", flush=True)
        server.serve_forever()


def client(target: str, host_header: str, connects: int, megabytes: int) -> None:
    address = socket.getaddrinfo(target, PORT, socket.AF_INET, socket.SOCK_STREAM)[0][4]
    request = f"GET /lat HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode()
    times = []
    for _ in range(connects):
        started = time.perf_counter()
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(request)
            answer = b""
            while not answer.endswith(b"ok"):
                more = s.recv(4096)
                if not more:
                    raise SystemExit(f"connection closed early: {answer!r}")
                answer += more
        times.append(time.perf_counter() - started)
    size = megabytes << 20
    block = b"y" * (1 << 20)
    with socket.create_connection(address, timeout=30) as s:
        started = time.perf_counter()
        s.sendall(f"put {size}\n".encode())
        for _ in range(megabytes):
            s.sendall(block)
        assert s.recv(4) == b"done"
        upload = time.perf_counter() - started
    with socket.create_connection(address, timeout=30) as s:
        started = time.perf_counter()
        s.sendall(f"get {size}\n".encode())
        got = 0
        buffer = bytearray(1 << 20)
        while got < size:
            n = s.recv_into(buffer)  # no new bytes object per read
            if not n:
                raise SystemExit("download cut short")
            got += n
        download = time.perf_counter() - started
    times.sort()
    print(json.dumps({"address": address[0], "p50_ms": 1000 * statistics.median(times),
                      "p95_ms": 1000 * times[int(0.95 * (len(times) - 1))],
                      "upload_MBps": megabytes / upload, "download_MBps": megabytes / download}))


# -- the orchestration -------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connects", type=int, default=300)
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="the paths take turns; medians are shown")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from sandlot._net import netns
    from sandlot._net.broker import Broker
    from sandlot._net.dns import Upstream
    from sandlot._net.log import DecisionLog
    from sandlot._net.policy import NetworkPolicy
    from tests import netlab
    from tests.netns_holder import LoopInNamespace, NetnsHolder

    problem = netlab.skip_reason()
    if problem:
        raise SystemExit(f"cannot bench here: {problem}")
    me = [sys.executable, "-I", __file__]
    with netlab.Lab() as lab, NetnsHolder() as sandbox_pid:
        lab.set_record(NAME, [netlab.LAB_V4])
        server = lab.popen(me + ["serve", netlab.LAB_V4], stdout=subprocess.PIPE, text=True)
        loop = None
        try:
            assert server.stdout.readline().strip() == "ready"
            configure_seconds = [netns.configure(sandbox_pid) for _ in range(5)]
            listeners = netns.open_listeners(sandbox_pid)
            loop = LoopInNamespace(lab.ns_path)
            policy = NetworkPolicy.build({"allow": [f"{netlab.LAB_V4}:{PORT}", f"{NAME}:{PORT}"]})

            async def start() -> Broker:
                broker = Broker(policy, DecisionLog(), Upstream([(netlab.DNS, 53)]))
                await broker.start(listeners)
                return broker

            broker = loop.run(start())

            def run_client(prefix: list[str], target: str, host_header: str) -> dict:
                done = subprocess.run(prefix + me + ["client", target, host_header, str(args.connects),
                                                     str(args.megabytes)],
                                      capture_output=True, text=True, timeout=600, env={"PATH": os.environ["PATH"]})
                if done.returncode != 0:
                    raise SystemExit(f"client failed: {done.stderr}")
                return json.loads(done.stdout)

            in_lab = lab.command([], resolv=True)
            in_sandbox = ["nsenter", f"--net=/proc/{sandbox_pid}/ns/net", "--"]
            paths = {"direct": (in_lab, NAME), "broker-ip": (in_sandbox, netlab.LAB_V4),
                     "broker-name": (in_sandbox, NAME)}
            rounds: dict[str, list[dict]] = {path: [] for path in paths}
            for _ in range(args.rounds):  # interleaved, so that a busy moment hits every path alike
                for path, (prefix, target) in paths.items():
                    rounds[path].append(run_client(prefix, target, target))
            results = {path: {key: statistics.median(r[key] for r in runs) for key in runs[0] if key != "address"}
                       for path, runs in rounds.items()}
            stats = loop.call(broker.stats)
            loop.run(broker.close())
        finally:
            if loop is not None:
                loop.close()
            server.kill()
            server.wait()
    base = results["direct"]
    print(f"{args.rounds} rounds, {args.connects} connects and {args.megabytes} MB each way per path and round; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"netns configure (nsenter + ip -batch + nft -f, 5 runs): "
          f"median {1000 * statistics.median(configure_seconds):.1f} ms")
    print(f"{'path':<12} {'p50 ms':>8} {'p95 ms':>8} {'up MB/s':>9} {'down MB/s':>10}   "
          f"{'p50 x':>6} {'p95 x':>6} {'up x':>6} {'down x':>6}")
    for path, r in results.items():
        print(f"{path:<12} {r['p50_ms']:8.3f} {r['p95_ms']:8.3f} {r['upload_MBps']:9.0f} {r['download_MBps']:10.0f}   "
              f"{r['p50_ms'] / base['p50_ms']:6.2f} {r['p95_ms'] / base['p95_ms']:6.2f} "
              f"{r['upload_MBps'] / base['upload_MBps']:6.2f} {r['download_MBps'] / base['download_MBps']:6.2f}")
    print(f"broker counters: connections {stats['connections']}, allowed {stats['allowed']}, "
          f"denied {stats['denied']}, bytes out {stats['bytes_out']}, in {stats['bytes_in']}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "client":
        client(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
