"""The gateway's DNS: the DNS front (dnsdist) the agent asks, and the resolver (dnsmasq) behind it.

The **front** listens where the sandbox's resolv.conf points (127.0.0.1:53) and narrows what a
query may carry before anything is forwarded: a plain query (one question of class IN, no
records but the EDNS one), only the query types an agent needs (A, AAAA, CNAME, HTTPS, SVCB,
plus any configured), names of hostname characters with labels no longer than the limit, no
EDNS option but a cookie, and a capped query rate. What it refuses is answered
REFUSED and written to a log the host reads (one line per refusal up to a limit, then counts).

The **resolver** answers NXDOMAIN for every name not listed, forwards listed names to the
upstream servers, refuses answers in private, loopback and link-local ranges (rebinding), and
files the answers into the firewall's sets, which decide what the proxy is handed. It runs as the
one uid the firewall lets reach the upstream servers, on a privileged loopback port only the
front may reach (the proxy asks through the front too).
"""

from __future__ import annotations

from collections.abc import Iterable

from kapsis.network.firewall import name_sets
from kapsis.network.gateway_layout import (
    DNS_FRONT_SOURCE,
    RESOLVER_PORT,
    RESOLVER_USER,
    TABLE,
)
from kapsis.network.policy import NON_PUBLIC_V4, NON_PUBLIC_V6, AllowRule, NetworkPolicy

# Refusals written one per line; beyond this, only counted (a flood must not fill the disk).
REFUSALS_RECORDED = 1000
EDNS_COOKIE = 10


def _covered_by_wildcard(name: str, policy: NetworkPolicy) -> bool:
    """Whether a listed ``*.domain`` already allows the subdomains of ``name``."""
    for rule in policy.names():
        if rule.kind == "wildcard":
            domain = rule.pattern.removeprefix("*.")
            if name == domain or name.endswith(f".{domain}"):
                return True
    return False


def _dnsmasq_pattern(rule: AllowRule) -> str:
    return rule.pattern  # "*.example.com" is dnsmasq's own "subdomains only" syntax


def dnsmasq_config(
    policy: NetworkPolicy,
    upstreams: Iterable[str],
    log_file: str,
    resolve_only: Iterable[str] = (),
) -> str:
    """dnsmasq's configuration: NXDOMAIN for all but the listed names, answers into the sets.

    ``resolve_only``: exact names answered too but *not* filed into any set, so the firewall
    still refuses them to the agent (Kubernetes: the git host, for the finishing step).
    """
    servers = list(upstreams)
    lines = [
        "no-resolv",
        "no-hosts",
        "no-poll",
        "pid-file=",
        "bind-interfaces",
        "listen-address=127.0.0.1",
        f"port={RESOLVER_PORT}",
        f"user={RESOLVER_USER}",
        "group=nogroup",
        "cache-size=1000",
        # Answers in non-public ranges become NXDOMAIN (DNS rebinding). Spelled out rather than
        # dnsmasq's stop-dns-rebind, whose list is fixed and differs from the firewall's.
        *(f"bogus-nxdomain={network}" for network in (*NON_PUBLIC_V4, *NON_PUBLIC_V6)),
        "log-queries=extra",
        f"log-facility={log_file}",
        "log-async=25",
        # Every name not listed below: no such domain.
        "address=/#/",
    ]
    for rule in policy.names():
        pattern = _dnsmasq_pattern(rule)
        for server in servers:
            lines.append(f"server=/{pattern}/{server}")
        if rule.kind == "name" and not _covered_by_wildcard(rule.pattern, policy):
            # An exact name: its subdomains stay unknown.
            lines.append(f"address=/*.{rule.pattern}/")
    listed = {rule.pattern for rule in policy.names()}
    for name in sorted(set(resolve_only) - listed):
        lines += [f"server=/{name}/{server}" for server in servers]
        if not _covered_by_wildcard(name, policy):
            lines.append(f"address=/*.{name}/")
    for domain, (v4, v6) in sorted(name_sets(policy).items()):
        # nftset matches a domain and its subdomains ("*." is not special there).
        lines.append(f"nftset=/{domain}/4#inet#{TABLE}#{v4},6#inet#{TABLE}#{v6}")
    return "\n".join(lines) + "\n"


def name_pattern(max_label: int) -> str:
    """A query name of hostname characters whose labels are at most ``max_label`` long.

    Checked on dnsdist's text form of the name, which spells every other byte (a dot inside a
    label included) as an escape with a backslash, so such a name never matches.
    """
    label = f"[A-Za-z0-9_-]{{1,{max_label}}}"
    return f"^({label}[.])*{label}[.]?$"


def dns_front_config(policy: NetworkPolicy, refused_log: str, counts_file: str) -> str:
    """dnsdist's configuration (Lua): the checks every query of the agent passes first."""
    limits = policy.dns
    rate, burst = limits.max_queries_per_second, limits.max_queries_per_second * 4
    types = ", ".join(f"QTypeRule(DNSQType.{qtype})" for qtype in policy.allowed_query_types())
    return f"""-- The Kapsis DNS front (dnsdist): every query of the agent passes these checks.
setSecurityPollSuffix("")
setLocal("127.0.0.1:53", {{reusePort=false}})
setACL({{"127.0.0.0/8"}})
setMaxTCPClientThreads(2)
setRingBuffersSize(100)
newServer({{address="127.0.0.1:{RESOLVER_PORT}", source="{DNS_FRONT_SOURCE}", name="resolver",
  checkInterval=86400, maxCheckFailures=1000000, useClientSubnet=false}}):setUp()

-- Both files are made by the entrypoint, writable by the front.
local refused = assert(io.open("{refused_log}", "a"))
refused:setvbuf("line")
local counted = assert(io.open("{counts_file}", "w"))
local REASONS = {{"rate", "form", "type", "name", "edns"}}
local recorded, counts, dirty = 0, {{rate=0, form=0, type=0, name=0, edns=0}}, false
local function refuse(reason)
  return function(dq)
    counts[reason] = counts[reason] + 1
    dirty = true
    if recorded < {REFUSALS_RECORDED} then
      recorded = recorded + 1
      refused:write(reason, "\\t", dq.qtype, "\\t", dq.qname:toString(), "\\n")
    end
    return DNSAction.Refused, ""
  end
end
-- Called by dnsdist every second: the counts, which go on where the lines above stop. They only
-- grow, so each rewrite from the start covers the one before.
function maintenance()
  if dirty then
    dirty = false
    counted:seek("set", 0)
    for _, reason in ipairs(REASONS) do counted:write(reason, "\\t", counts[reason], "\\n") end
    counted:flush()
  end
end
local function foreign_edns_option(dq)
  for code, _ in pairs(dq:getEDNSOptions()) do
    if code ~= {EDNS_COOKIE} then return true end
  end
  return false
end

addAction(NotRule(MaxQPSRule({rate}, {burst})), LuaAction(refuse("rate")))
-- One question of class IN in a standard query, nothing in the answer or authority sections,
-- nothing added but the EDNS record, nothing after the records: no other part of a query
-- travels on.
addAction(OrRule({{NotRule(OpcodeRule(DNSOpcode.Query)), NotRule(QClassRule(DNSClass.IN)),
  NotRule(RecordsCountRule(DNSSection.Question, 1, 1)),
  NotRule(RecordsCountRule(DNSSection.Answer, 0, 0)),
  NotRule(RecordsCountRule(DNSSection.Authority, 0, 0)),
  NotRule(RecordsCountRule(DNSSection.Additional, 0, 1)),
  AndRule({{RecordsCountRule(DNSSection.Additional, 1, 1),
    NotRule(RecordsTypeCountRule(DNSSection.Additional, DNSQType.OPT, 1, 1))}}),
  TrailingDataRule()}}), LuaAction(refuse("form")))
addAction(NotRule(OrRule({{{types}}})), LuaAction(refuse("type")))
addAction(NotRule(RegexRule("{name_pattern(limits.max_label_length)}")), LuaAction(refuse("name")))
addAction(LuaRule(foreign_edns_option), LuaAction(refuse("edns")))
"""
