"""Cost of filtered network mode: DNS, HTTP and sandbox start, against open/none in the same run.

    sudo python benchmarks/network.py [--runs 7] [--queries 40] [--requests 200]

Uses the test internet of the integration tests (a network namespace with a DNS and an HTTP
server on documentation addresses; nothing leaves the machine). Prints medians over ``--runs``
sandboxes of:

* DNS resolution time per query (each name asked once, so the gateway forwards it upstream),
  through the gateway's resolver (filtered) against asking the same server directly (open);
* HTTP requests per second to the test host (sequential GETs), filtered against open;
* wall time of ``kapsis run --task true``, filtered against none (the gateway's start and
  self-test).

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

from tests.integration.internet import REMOTE_V4, start_internet  # noqa: E402

KAPSIS = [sys.executable, "-m", "kapsis"]

AGENT_BENCH = r"""
import json, socket, struct, sys, time, http.client, random
prefix, server, queries, requests = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
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
target = "203.0.113.2"
start = time.perf_counter()
for _ in range(requests):
    c = http.client.HTTPConnection(target, 80, timeout=3)
    c.request("GET", "/")
    c.getresponse().read()
    c.close()
elapsed = time.perf_counter() - start
print(json.dumps({"dns_ms": sorted(dns)[len(dns) // 2] * 1000, "http_rps": requests / elapsed}))
"""


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    names = {
        f"r{run}{mode[0]}-{i}.bench.test": (REMOTE_V4,)
        for run in range(args.runs)
        for mode in ("filtered", "open")
        for i in range(args.queries)
    }
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
        samples: dict[str, list[float]] = {
            "dns ms (filtered, via gateway)": [],
            "dns ms (open, direct)": [],
            "http req/s (filtered)": [],
            "http req/s (open)": [],
            "kapsis run s (filtered)": [],
            "kapsis run s (none)": [],
        }
        for run in range(args.runs):
            for mode, server in (("filtered", "127.0.0.1"), ("open", internet.dns_server)):
                prefix = f"r{run}{mode[0]}"
                task = (
                    f"python3 /workspace/bench.py {prefix} {server} {args.queries} {args.requests}"
                )
                flags = ["--allow", "*.bench.test", "--allow", f"{REMOTE_V4}:80"]
                result = subprocess.run(
                    [*base, "--network-mode", mode, *flags, "--task", task],
                    env=env, capture_output=True, text=True, check=True,
                )  # fmt: skip
                figures = json.loads(result.stdout.strip().splitlines()[-1])
                label = "via gateway" if mode == "filtered" else "direct"
                samples[f"dns ms ({mode}, {label})"].append(figures["dns_ms"])
                samples[f"http req/s ({mode})"].append(figures["http_rps"])
            for mode in ("filtered", "none"):
                samples[f"kapsis run s ({mode})"].append(
                    timed([*base, "--network-mode", mode, "--task", "true"], env)
                )
    medians = {name: statistics.median(values) for name, values in samples.items()}
    for name, value in medians.items():
        print(f"{name:>32}: median {value:9.2f} over {args.runs} runs")
    dns = medians["dns ms (filtered, via gateway)"] / medians["dns ms (open, direct)"]
    http = medians["http req/s (filtered)"] / medians["http req/s (open)"]
    start = medians["kapsis run s (filtered)"] / medians["kapsis run s (none)"]
    print(f"{'ratios':>32}: dns filtered/open {dns:.2f}, http filtered/open {http:.2f}, "
          f"run filtered/none {start:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
