"""Cost of filtered network mode: DNS, the name proxy and sandbox start, against open/none.

    sudo python benchmarks/network.py [--runs 5] [--queries 40] [--megabytes 256]

Uses the test internet of the integration tests (a network namespace with DNS, HTTP and HTTPS
servers on documentation addresses; nothing leaves the machine). Each figure is measured inside
a sandbox, filtered and open in the same run, and printed as the median over ``--runs``
sandboxes with the ratio against its baseline:

* DNS resolution time per query (each name asked once, so the gateway forwards it upstream),
  through the gateway (DNS front and resolver) against asking the same server directly (open);
* HTTP and HTTPS download throughput of ``--megabytes`` from the test host, by name through the
  gateway's proxy (filtered) against the same request straight to it (open); target >= 0.9;
* connection set-up time: TCP connect + TLS handshake + a small GET, through the proxy against
  direct;
* wall time of ``kapsis run --task true``, filtered against none (the gateway's start and
  self-test); target <= 1.5.

The test host's servers are Python's; where they are the slower side, both modes wait on them
alike and the ratio says less about the proxy (the absolute MB/s are printed to judge that).
Not a test: the figures depend on the machine.
"""

from __future__ import annotations

import os
import sys

# benchmarks/operator.py shares its name with the standard library's ``operator``: this folder
# must not come first on the path (as it does for ``python benchmarks/NAME.py``).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.internet import DEFAULT_NAMES, REMOTE_V4, start_internet  # noqa: E402

KAPSIS = [sys.executable, "-m", "kapsis"]
HOST = "bulk.bench.test"

AGENT_BENCH = r"""
import json, socket, ssl, struct, sys, time, random
prefix, server, address, queries, size = sys.argv[1:6]
queries, size = int(queries), int(size)
def resolve(name):
    qid = random.randrange(65536)
    packet = struct.pack(">HHHHHH", qid, 0x100, 1, 0, 0, 0)
    packet += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0\0\1\0\1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3); s.sendto(packet, (server, 53))
        while struct.unpack(">H", s.recv(512)[:2])[0] != qid: pass
dns = []
for i in range(queries):
    name = f"{prefix}-{i}.bench.test"  # asked once: never in the resolver's cache
    start = time.perf_counter(); resolve(name); dns.append(time.perf_counter() - start)
resolve("BULKHOST")  # filtered: the proxy's destination check wants a resolved address
context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
def get(port, path, tls):
    sock = socket.create_connection((address, port), timeout=10)
    if tls:
        sock = context.wrap_socket(sock, server_hostname="BULKHOST")
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: BULKHOST\r\nConnection: close\r\n\r\n".encode())
    buffer, total = bytearray(1 << 20), 0
    while n := sock.recv_into(buffer):
        total += n
    sock.close()
    return total
out = {"dns_ms": sorted(dns)[len(dns) // 2] * 1000}
for label, port, tls in (("http", 80, False), ("https", 443, True)):
    start = time.perf_counter(); got = get(port, f"/bulk/{size}", tls)
    out[f"{label}_mbps"] = got / (time.perf_counter() - start) / 1e6
setup = []
for _ in range(20):
    start = time.perf_counter(); get(443, "/small", True); setup.append(time.perf_counter() - start)
out["setup_ms"] = sorted(setup)[len(setup) // 2] * 1000
print(json.dumps(out))
""".replace("BULKHOST", HOST)


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--megabytes", type=int, default=256)
    args = parser.parse_args()
    names = {
        **DEFAULT_NAMES,
        HOST: (REMOTE_V4,),
        **{
            f"r{run}{mode[0]}-{i}.bench.test": (REMOTE_V4,)
            for run in range(args.runs)
            for mode in ("filtered", "open")
            for i in range(args.queries)
        },
    }
    size = args.megabytes * 1_000_000
    with (
        tempfile.TemporaryDirectory(prefix="kapsis-bench-net-") as scratch,
        start_internet(names) as internet,
    ):
        project = Path(scratch) / "project"
        project.mkdir()
        (project / "bench.py").write_text(AGENT_BENCH)
        config = Path(scratch) / "config.yaml"
        config.write_text(f"network:\n  dns_servers: [{internet.dns_server}]\n")
        env = {**os.environ, "KAPSIS_HOME": str(Path(scratch) / "home")}
        base = [*KAPSIS, "run", str(project), "--config", str(config)]
        samples: dict[str, dict[str, list[float]]] = {
            key: {"filtered": [], "open": []}
            for key in ("dns_ms", "http_mbps", "https_mbps", "setup_ms")
        }
        starts: dict[str, list[float]] = {"filtered": [], "none": []}
        for run in range(args.runs):
            for mode, server in (("filtered", "127.0.0.1"), ("open", internet.dns_server)):
                prefix = f"r{run}{mode[0]}"
                task = f"python3 /workspace/bench.py {prefix} {server} {REMOTE_V4} "
                task += f"{args.queries} {size}"
                flags = ["--allow", "*.bench.test", "--allow", HOST]
                result = subprocess.run(
                    [*base, "--network-mode", mode, *flags, "--task", task],
                    env=env, capture_output=True, text=True, check=True,
                )  # fmt: skip
                figures = json.loads(result.stdout.strip().splitlines()[-1])
                for key, values in samples.items():
                    values[mode].append(figures[key])
            for mode in ("filtered", "none"):
                starts[mode].append(timed([*base, "--network-mode", mode, "--task", "true"], env))
    print(f"median over {args.runs} runs (filtered: through the gateway; open: direct)")
    for key, label, better in (
        ("dns_ms", "DNS query, ms", "lower"),
        ("http_mbps", f"HTTP download of {args.megabytes} MB, MB/s", "higher"),
        ("https_mbps", f"HTTPS download of {args.megabytes} MB, MB/s", "higher"),
        ("setup_ms", "TLS connection set-up + small GET, ms", "lower"),
    ):
        filtered = statistics.median(samples[key]["filtered"])
        opened = statistics.median(samples[key]["open"])
        print(
            f"{label:>42}: filtered {filtered:9.2f}  open {opened:9.2f}  "
            f"ratio filtered/open {filtered / opened:5.2f} ({better} is better)"
        )
    filtered, none = statistics.median(starts["filtered"]), statistics.median(starts["none"])
    print(
        f"{'kapsis run --task true, s':>42}: filtered {filtered:9.2f}  none {none:9.2f}  "
        f"ratio filtered/none {filtered / none:5.2f} (target <= 1.5)"
    )


if __name__ == "__main__":
    main()
