"""What the gateway blocked, as one JSON object on stdout: ``{"blockedRequests": N}``.

Run by the gateway's entrypoint when the gateway is stopped. On Kubernetes the output becomes
the gateway container's termination message, which the operator reads into the request's
``status.blockedRequests`` - a count kept by the gateway, out of the agent's reach. It counts
what the host counts locally (kapsis.network.observe, shipped beside this file): refused DNS
queries plus refused connection attempts, less the gateway's own self-test.
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
    without_selftest,
)

# The same names as kapsis.network.gateway_config (a unit test holds them equal).
TABLE = "kapsis"
BLOCKED_SETS = ("blocked4", "blocked6")
DNS_LOG = Path("/var/log/kapsis/dns.log")


def main() -> None:
    dns_log = Path(sys.argv[1]) if len(sys.argv) > 1 else DNS_LOG
    try:
        dns_text = dns_log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        dns_text = ""
    listing = subprocess.run(
        ["nft", "-j", "list", "table", "inet", TABLE], capture_output=True, text=True, check=False
    )
    blocked = blocked_in_table(json.loads(listing.stdout or "{}"), BLOCKED_SETS)
    probe = (HERE / "probe-address").read_text().strip()
    dns, blocked = without_selftest(parse_dns_log(dns_text), blocked, probe)
    print(json.dumps({"blockedRequests": NetworkReport(dns, blocked).blocked_requests}))


if __name__ == "__main__":
    main()
