"""Names never lead to a non-public address, in a real kernel, for IPv4 and IPv6 alike.

The resolver files every answer for an allowlisted name in the name's nft set (dnsmasq's
nftset). Had it let a non-public address through, the firewall must still refuse it: the agent's
connection to it is not redirected to the proxy (``daddr != @nonpublic_v4/6`` in the to_proxy
chain), and the proxy's own connection to it is not accepted (``daddr != @nonpublic_v4/6`` in the
proxy's rule of the output chain). A public-looking address filed the same way is the control:
the agent reaches the proxy, the proxy reaches the host.

The rendered ruleset is loaded into a throwaway network namespace ("gw") joined by a veth pair
to a second one ("far") that holds both test hosts; nothing is sent anywhere else.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kapsis.network.firewall import name_sets, nft_ruleset
from kapsis.network.gateway_layout import PROXY_UID, TABLE
from kapsis.network.observe import parse_blocked_set
from kapsis.network.policy import NON_PUBLIC_V4, NON_PUBLIC_V6
from kapsis.network.proxy import proxy_ports

from .netgw import NFT, TCP_SEND, NetNs, make_policy, netns

POLICY = make_policy(hosts=("allowed.test",))
PORT = 443
PROXY_PORT = proxy_ports(POLICY)[PORT]
AGENT_UID = 1000
# The refuse chain's reject (ICMP administratively prohibited) as connect() reports it, at once:
# no time-out, and never a connection.
REFUSED = {errno.EHOSTUNREACH, errno.EACCES}


@dataclass(frozen=True)
class Family:
    public: str  # a host outside every non-public range (documentation space: never routed)
    nonpublic: str  # a host inside one of them
    gw_public: str  # the gateway's own address in each host's network
    gw_nonpublic: str
    prefix: int
    set_index: int  # 0 for the IPv4 name set and blocked set, 1 for the IPv6 ones
    nonpublic_ranges: tuple[str, ...]

    def links(self) -> list[tuple[str, str]]:
        """(gateway address, host address) with prefix length, one pair per network."""
        return [
            (f"{self.gw_public}/{self.prefix}", f"{self.public}/{self.prefix}"),
            (f"{self.gw_nonpublic}/{self.prefix}", f"{self.nonpublic}/{self.prefix}"),
        ]


FAMILIES = {
    "ipv4": Family("198.51.100.7", "10.20.0.7", "198.51.100.1", "10.20.0.1", 24, 0, NON_PUBLIC_V4),
    "ipv6": Family(
        "2001:db8:5::7", "fd00:5::7", "2001:db8:5::1", "fd00:5::1", 64, 1, NON_PUBLIC_V6
    ),
}

# In far, as root: a TCP server on PORT of every address given; one JSON line a connection.
FAR_SERVER = """
import json, socket, sys, threading
lock = threading.Lock()
def serve(sock, address):
    while True:
        conn, _ = sock.accept()
        conn.settimeout(2)
        with conn:
            try:
                data = conn.recv(512)
            except OSError:
                continue
            with lock:
                print(json.dumps({"to": address, "data": data.decode()}), flush=True)
            conn.sendall(b"far:" + data)
for address in sys.argv[2:]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.create_server((address, int(sys.argv[1])), family=family)
    threading.Thread(target=serve, args=(sock, address), daemon=True).start()
print(json.dumps({"ready": True}), flush=True)
threading.Event().wait()
"""


class Gateway:
    """gw with the ruleset loaded and the proxy's port served by a stand-in (on 127.0.0.1 and
    ::1); far with both hosts of each family serving PORT."""

    def __init__(self, gw: NetNs, far: NetNs, ruleset: str, folder: Path) -> None:
        self.gw = gw
        gw.ip("link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", far.name)
        for family in FAMILIES.values():
            # No duplicate address detection: IPv6 addresses usable at once.
            nodad = ["nodad"] if family.set_index == 1 else []
            for own, host in family.links():
                gw.ip("addr", "add", own, "dev", "veth0", *nodad)
                far.ip("addr", "add", host, "dev", "veth1", *nodad)
        for namespace, device in ((gw, "veth0"), (far, "veth1")):
            namespace.ip("link", "set", device, "up")
        (folder / "rules.nft").write_text(ruleset)
        gw.run([str(NFT), "-f", str(folder / "rules.nft")])
        hosts = [host for family in FAMILIES.values() for host in (family.public, family.nonpublic)]
        self._far = far.serve(FAR_SERVER, str(PORT), *hosts)
        self._proxy = gw.serve(
            FAR_SERVER.replace("far:", "proxy:"), str(PROXY_PORT), "127.0.0.1", "::1"
        )

    def resolved(self, family: Family, address: str) -> None:
        """What dnsmasq does with an answer for allowed.test: file it in the name's set."""
        name_set = name_sets(POLICY)["allowed.test"][family.set_index]
        self.gw.run([str(NFT), "add", "element", "inet", TABLE, name_set, f"{{ {address} }}"])

    def tcp(self, uid: int, address: str, data: str) -> dict[str, Any]:
        result = self.gw.python(TCP_SEND, address, str(PORT), data, uid=uid)
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    @staticmethod
    def _data(seen: list[dict[str, Any]]) -> list[str]:
        time.sleep(0.2)  # the servers' output is read by threads
        return [item["data"] for item in seen]

    def far_got(self) -> list[str]:
        return self._data(self._far)

    def proxy_got(self) -> list[str]:
        return self._data(self._proxy)

    def blocked(self, family: Family) -> set[tuple[str, str, int]]:
        name = ("blocked4", "blocked6")[family.set_index]
        listing = json.loads(self.gw.run([str(NFT), "-j", "list", "set", "inet", TABLE, name]))
        return {(b.address, b.protocol, b.port) for b in parse_blocked_set(listing)}


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    with contextlib.ExitStack() as stack:
        gw = stack.enter_context(netns(NFT))
        far = stack.enter_context(netns(NFT))
        yield Gateway(gw, far, nft_ruleset(POLICY, POLICY.dns_servers), tmp_path)


def _in_ranges(address: str, ranges: tuple[str, ...]) -> bool:
    return any(ipaddress.ip_address(address) in ipaddress.ip_network(r) for r in ranges)


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())
def test_the_test_hosts_are_on_the_right_side_of_the_non_public_ranges(family: Family) -> None:
    assert _in_ranges(family.nonpublic, family.nonpublic_ranges)
    assert not _in_ranges(family.public, family.nonpublic_ranges)


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())
def test_the_agent_is_not_proxied_to_a_non_public_address_filed_for_a_name(
    gateway: Gateway, family: Family
) -> None:
    gateway.resolved(family, family.public)
    gateway.resolved(family, family.nonpublic)

    public = gateway.tcp(AGENT_UID, family.public, "agent-public")
    nonpublic = gateway.tcp(AGENT_UID, family.nonpublic, "agent-nonpublic")

    # control: the public-looking address is redirected to the proxy, as names are
    assert public == {"error": None, "reply": "proxy:agent-public"}
    # the non-public one is refused: it reaches neither the proxy nor the host, and is counted
    assert nonpublic["reply"] is None and nonpublic["error"] in REFUSED
    assert gateway.proxy_got() == ["agent-public"]
    assert gateway.far_got() == []
    assert (family.nonpublic, "tcp", PORT) in gateway.blocked(family)


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())
def test_the_proxy_does_not_reach_a_non_public_address_filed_for_a_name(
    gateway: Gateway, family: Family
) -> None:
    gateway.resolved(family, family.public)
    gateway.resolved(family, family.nonpublic)

    public = gateway.tcp(PROXY_UID, family.public, "proxy-public")
    nonpublic = gateway.tcp(PROXY_UID, family.nonpublic, "proxy-nonpublic")

    # control: the proxy goes out directly to the public-looking address
    assert public == {"error": None, "reply": "far:proxy-public"}
    assert nonpublic["reply"] is None and nonpublic["error"] in REFUSED
    assert gateway.far_got() == ["proxy-public"]
    assert (family.nonpublic, "tcp", PORT) in gateway.blocked(family)
