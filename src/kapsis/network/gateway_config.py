"""The gateway's configuration files, rendered from a :class:`NetworkPolicy`: pure text.

Both backends mount the same files into the same gateway image (Podman from the sandbox's
directory, Kubernetes from a ConfigMap), so they enforce the same rules with the same code:
the firewall (:mod:`kapsis.network.firewall`), the DNS front and the resolver
(:mod:`kapsis.network.resolver`) and the name proxy (:mod:`kapsis.network.proxy`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from kapsis.network.firewall import nft_ruleset
from kapsis.network.gateway_layout import (
    CONFIG_TARGET,
    DNS_LOG,
    DNS_REFUSED_COUNTS,
    DNS_REFUSED_LOG,
    LOG_TARGET,
)
from kapsis.network.policy import PROBE_CANDIDATES, NetworkPolicy, probe_address
from kapsis.network.proxy import name_list_files, proxy_config, proxy_ports
from kapsis.network.resolver import dns_front_config, dnsmasq_config

__all__ = ["PROBE_CANDIDATES", "gateway_config_files", "probe_address"]


def gateway_config_files(
    policy: NetworkPolicy,
    upstreams: Iterable[str],
    *,
    owner_ports: Mapping[int, tuple[int, ...]] | None = None,
    resolve_only: Iterable[str] = (),
) -> dict[str, str]:
    """Every configuration file of one gateway, by file name (see ``entrypoint.sh``)."""
    servers = tuple(upstreams)
    files = {
        "rules.nft": nft_ruleset(policy, servers, owner_ports),
        "dnsmasq.conf": dnsmasq_config(
            policy, servers, f"{LOG_TARGET}/{DNS_LOG}", resolve_only=resolve_only
        ),
        "dnsdist.conf": dns_front_config(
            policy, f"{LOG_TARGET}/{DNS_REFUSED_LOG}", f"{LOG_TARGET}/{DNS_REFUSED_COUNTS}"
        ),
        "probe-address": probe_address(policy) + "\n",
        # The self-test checks that the proxy answers on each of its ports.
        "proxy-ports": "".join(f"{port}\n" for port in proxy_ports(policy).values()),
    }
    haproxy = proxy_config(policy, CONFIG_TARGET)
    if haproxy is not None:
        files["haproxy.cfg"] = haproxy
        files |= name_list_files(policy)
    return files
