"""What the gateway blocked, as one JSON object on stdout: ``{"blockedRequests": N}``.

Run by the gateway's entrypoint when the gateway is stopped, as ``report.py [LOG_DIR]``. On
Kubernetes the output becomes the gateway container's termination message, which the operator
reads into the request's ``status.blockedRequests`` - a count kept by the gateway, out of the
agent's reach. It counts what the host counts locally (kapsis.network.observe, shipped beside
this file): refused DNS queries (resolver and DNS front), refused connection attempts and
connections or requests the proxy refused, less the gateway's own self-test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# observe.py is kapsis.network.observe, shipped beside this file into the gateway.
from observe import (  # type: ignore[import-not-found]  # noqa: E402
    NetworkReport,
    blocked_in_table,
    parse_dns_log,
    parse_dns_refusals,
    parse_proxy_log,
    proxy_without_selftest,
    without_selftest,
)

# The same names as kapsis.network.gateway_layout (a unit test holds them equal).
TABLE = "kapsis"
BLOCKED_SETS = ("blocked4", "blocked6")
DNS_FRONT_SOURCE = "127.0.0.2"
LOG_DIR = Path("/var/log/kapsis")
MAX_LOG_BYTES = 16 << 20


def read(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            return handle.read(MAX_LOG_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return ""


def main() -> None:
    logs = Path(sys.argv[1]) if len(sys.argv) > 1 else LOG_DIR
    listing = subprocess.run(
        ["nft", "-j", "list", "table", "inet", TABLE], capture_output=True, text=True, check=False
    )
    blocked = blocked_in_table(json.loads(listing.stdout or "{}"), BLOCKED_SETS)
    probe = (HERE / "probe-address").read_text().strip()
    dns = parse_dns_log(read(logs / "dns.log"), clients=(DNS_FRONT_SOURCE,))
    refusals, unrecorded = parse_dns_refusals(
        read(logs / "dns-refused.tsv"), read(logs / "dns-refused.counts")
    )
    dns, blocked = without_selftest(dns + refusals, blocked, probe)
    proxy = proxy_without_selftest(parse_proxy_log(read(logs / "proxy.log")))
    report = NetworkReport(dns, blocked, proxy=proxy, dns_refused_unrecorded=unrecorded)
    print(json.dumps({"blockedRequests": report.blocked_requests}))


if __name__ == "__main__":
    main()
