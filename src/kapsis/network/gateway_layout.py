"""Who is who inside a gateway: its users, its loopback ports, its connection marks, its files.

Shared by the renderers of the gateway's configuration (:mod:`kapsis.network.firewall`,
:mod:`kapsis.network.resolver`, :mod:`kapsis.network.proxy`) and by the backends that start it.
Each gateway daemon runs as a uid of its own, so the firewall can tie every packet it accepts to
the process that sent it; the agent never runs as any of them (its uids live in another range,
and it holds no capability to change uid).
"""

from __future__ import annotations

TABLE = "kapsis"
BLOCKED_SETS = ("blocked4", "blocked6")

# dnsmasq: the allowlisting resolver, the only uid that reaches the upstream DNS servers.
RESOLVER_USER = "kapsis-dns"
RESOLVER_UID = 990
# HAProxy: the proxy that names every TCP connection to an allowlisted name.
PROXY_USER = "kapsis-proxy"
PROXY_UID = 991
# dnsdist: the DNS front the agent talks to (query types, label length, query rate).
DNS_FRONT_USER = "kapsis-dnsfront"
DNS_FRONT_UID = 992
GATEWAY_UIDS = (RESOLVER_UID, PROXY_UID, DNS_FRONT_UID)

# The resolver listens on loopback behind the DNS front, which alone may ask it. A port below
# 1024: binding it takes CAP_NET_BIND_SERVICE, which the agent never has. (Any uid may share an
# unprivileged UDP port with a socket that set SO_REUSEADDR, as dnsmasq's do, and take its
# queries and answer them.) The gateway pins net.ipv4.ip_unprivileged_port_start at 1024.
RESOLVER_PORT = 54
UNPRIVILEGED_PORT_START = 1024
# The DNS front's address toward the resolver: the resolver's log holds the queries that came
# through the front (the agent's, and the proxy's lookups of the names the agent's connections
# carried) under this source address, apart from anything else (all of 127.0.0.0/8 is local).
DNS_FRONT_SOURCE = "127.0.0.2"
# The proxy listens on PROXY_PORT_BASE + i for the i-th port that allowlisted names may reach.
PROXY_PORT_BASE = 15100

# Connection marks: who opened a flow. A packet of a marked flow leaves only from its owner.
MARK_RESOLVER = 1
MARK_PROXY = 2
MARK_AGENT = 3
MARK_OWNER_BASE = 16  # + i: the i-th extra owner (Kubernetes: the finishing step)

# What the gateway container may do, on both backends (nothing else has NET_ADMIN).
GATEWAY_CAPABILITIES = ("NET_ADMIN", "NET_BIND_SERVICE", "SETUID", "SETGID")

# Files in the gateway's log directory.
DNS_LOG = "dns.log"
DNS_REFUSED_LOG = "dns-refused.tsv"
PROXY_LOG = "proxy.log"
DNS_REFUSED_COUNTS = "dns-refused.counts"
VERDICT = "selftest"

# Where the gateway container sees its files (read-only config, and its own log directory).
CONFIG_TARGET = "/etc/kapsis-gateway"
LOG_TARGET = "/var/log/kapsis"
