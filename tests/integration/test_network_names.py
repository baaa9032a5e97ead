"""Filtered mode enforces names, not only addresses: the escape suite of the proxy and DNS front.

Each attack runs in a real sandbox against the test internet, where allowed.test and other.test
are served on one address; each has a control that shows the same request succeeds where it is
allowed (the listed name, or open mode), so a refusal proves the gateway and not a broken test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .internet import REMOTE_V4, Internet
from .kapsis_runner import Kapsis
from .sandbox_probe import GATEWAY, config, failed, probe, probe_project

pytestmark = pytest.mark.integration


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return probe_project(tmp_path)


def network_log(kapsis: Kapsis, agent_id: str) -> list[dict[str, Any]]:
    path = kapsis.home / "network" / f"{agent_id}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# owners, not flows


def test_the_agent_cannot_send_through_the_resolvers_upstream_flow(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    # The agent makes the gateway's resolver ask the upstream (a flow from some UDP port to
    # upstream:53, with no owner in connection tracking), then sends its own query for an
    # unlisted name to the upstream from every port it can bind: one of them is that flow's.
    internet.reset_logs()
    attack = ["reuse_resolver_flows", internet.dns_server, "leak.other.test", "allowed.test"]
    results, _ = probe(
        kapsis, project, [attack], "--config", str(config(tmp_path, internet)),
        "--allow", "allowed.test", "--agent-id", "flow1",
    )  # fmt: skip
    assert results[0]["tried"] > 60000, results  # it did try (almost) every port
    assert results[0]["sent"] == 0 and results[0]["replies"] == 0, results
    names = [query.name for query in internet.dns_queries()]
    assert "leak.other.test" not in names
    # Control: the gateway's own query for the listed name did reach the upstream.
    assert "allowed.test" in names
    assert kapsis.status("flow1")["blocked_requests"] >= 60000


def test_in_open_mode_the_upstream_sees_the_agents_query(
    kapsis: Kapsis, project: Path, internet: Internet
) -> None:
    """Control of the test above: a query the agent gets to the upstream is seen there."""
    internet.reset_logs()
    results, _ = probe(
        kapsis, project, [["resolve", "leak.other.test", REMOTE_V4, "A"]], "--network-mode", "open"
    )
    assert results[0]["rcode"] == 3
    assert "leak.other.test" in [query.name for query in internet.dns_queries()]


def test_the_agent_cannot_take_the_resolvers_port(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    """Sharing the resolver's UDP port (SO_REUSEADDR) would hand the agent the proxy's and the
    DNS front's lookups to answer; the port is privileged, so the bind fails."""
    checks = [["bind_udp", "127.0.0.1", 54], ["bind_udp", "127.0.0.1", 53]]
    checks += [["bind_udp", "127.0.0.1", 15053]]  # control: an unprivileged port can be bound
    results, _ = probe(
        kapsis, project, checks, "--config", str(config(tmp_path, internet)),
        "--allow", "allowed.test",
    )  # fmt: skip
    assert results[0].get("error") == "PermissionError", results
    assert results[1].get("error") == "PermissionError", results
    assert results[2] == {"bound": True}


# ---------------------------------------------------------------------------------------------
# names at the connection


def test_tls_to_an_allowlisted_address_with_another_name_or_none_is_refused(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    internet.reset_logs()
    checks = [
        ["resolve", "allowed.test", GATEWAY, "A"],
        ["https", REMOTE_V4, "/listed", "allowed.test"],
        ["https", REMOTE_V4, "/other", "other.test"],
        ["https", REMOTE_V4, "/fronted", "allowed.test", "other.test"],  # Host inside TLS
        ["https", REMOTE_V4, "/none", None],
    ]
    results, run = probe(
        kapsis, project, checks, "--config", str(config(tmp_path, internet)),
        "--allow", "allowed.test", "--agent-id", "sni1",
    )  # fmt: skip
    assert results[1]["status"] == 200  # control: the listed name
    assert failed(results[2]) and failed(results[4])
    # The limit of a proxy that never decrypts: the Host inside TLS is not seen, so a request
    # under the listed TLS name reaches that name's server whatever Host it names (README).
    assert results[3]["status"] == 200
    served = [(r.path, r.sni) for r in internet.http_requests()]
    assert ("/listed", "allowed.test") in served
    assert not any(path in ("/other", "/none") for path, _ in served)
    # Recorded with the name it asked for (and none for no name), and counted.
    refused = [e for e in network_log(kapsis, "sni1") if e["type"] == "proxy" and not e["allowed"]]
    assert {(e["name"], e["port"], e["reason"]) for e in refused} >= {
        ("other.test", 443, "name not on the allowlist for the port"),
        ("", 443, "no TLS server name or HTTP Host"),
    }
    assert kapsis.status("sni1")["blocked_requests"] >= 2
    assert "the gateway refused the connections other.test:443" in run.stderr
    # Control: in open mode both reach the server.
    opened, _ = probe(kapsis, project, [checks[2], checks[4]], "--network-mode", "open")
    assert opened[0]["status"] == 200 and opened[1]["status"] == 200


def test_http_to_an_allowlisted_address_with_another_host_is_refused(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    internet.reset_logs()
    checks = [
        ["resolve", "allowed.test", GATEWAY, "A"],
        ["http", REMOTE_V4, "/listed", 80, "allowed.test"],
        ["http", REMOTE_V4, "/other", 80, "other.test"],
        ["http", REMOTE_V4, "/by-address", 80, REMOTE_V4],
        ["http_pipelined", REMOTE_V4, ["allowed.test", "other.test"]],
    ]
    results, _ = probe(
        kapsis, project, checks, "--config", str(config(tmp_path, internet)),
        "--allow", "allowed.test",
    )  # fmt: skip
    assert results[1]["status"] == 200
    assert results[2]["status"] == 403 and results[3]["status"] == 403
    assert results[4]["statuses"][1:] in ([], [403])  # the second request never passes
    hosts = [request.host for request in internet.http_requests()]
    assert "allowed.test" in hosts
    assert "other.test" not in hosts and REMOTE_V4 not in hosts
    opened, _ = probe(kapsis, project, [checks[2]], "--network-mode", "open")
    assert opened[0]["status"] == 200


def test_http_requests_that_name_another_host_elsewhere_are_refused(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    """The listed Host, but another host in the request line, a second Host header, or a request
    smuggled in the body of the first: none reaches the other site on the shared address."""
    crlf = "\r\n"
    attacks = {
        "absolute": f"GET http://other.test/absolute HTTP/1.1{crlf}Host: allowed.test{crlf}"
        f"Connection: close{crlf}{crlf}",
        "two-hosts": f"GET /two-hosts HTTP/1.1{crlf}Host: allowed.test{crlf}Host: other.test{crlf}"
        f"Connection: close{crlf}{crlf}",
        "smuggled": f"POST /smuggle HTTP/1.1{crlf}Host: allowed.test{crlf}Content-Length: 44{crlf}"
        f"Transfer-Encoding: chunked{crlf}{crlf}0{crlf}{crlf}GET /smuggled HTTP/1.1{crlf}"
        f"Host: other.test{crlf}{crlf}",
        "control": f"GET /control HTTP/1.1{crlf}Host: allowed.test{crlf}Connection: close{crlf}"
        f"{crlf}",
    }
    checks = [["resolve", "allowed.test", GATEWAY, "A"]]
    checks += [["http_raw", REMOTE_V4, request] for request in attacks.values()]
    internet.reset_logs()
    results, _ = probe(
        kapsis, project, checks, "--config", str(config(tmp_path, internet)),
        "--allow", "allowed.test",
    )  # fmt: skip
    seen = [(request.host, request.path) for request in internet.http_requests()]
    assert ("allowed.test", "/control") in seen, (results, seen)  # control
    assert results[-1]["statuses"] == [200]
    assert not any("other.test" in f"{host} {path}" for host, path in seen), seen
    assert not any(path in ("/two-hosts", "/smuggled") for _, path in seen), seen


def test_http_hosts_in_disguise_and_upgrades_are_refused(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    """A Host the proxy would read one way and the server another (a comma list), a cleartext
    HTTP/2 upgrade (after it, nothing is read any more) and a header that frameworks take for
    the host: none names the other site to the server."""
    crlf = "\r\n"
    attacks = [
        f"GET /comma HTTP/1.1{crlf}Host: other.test,allowed.test{crlf}Connection: close"
        f"{crlf}{crlf}",
        f"GET /h2c HTTP/1.1{crlf}Host: allowed.test{crlf}Connection: Upgrade, HTTP2-Settings{crlf}"
        f"Upgrade: h2c{crlf}HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA{crlf}{crlf}",
        f"GET /forwarded HTTP/1.1{crlf}Host: allowed.test{crlf}X-Forwarded-Host: other.test{crlf}"
        f"Forwarded: host=other.test{crlf}Connection: close{crlf}{crlf}",
    ]
    checks = [["resolve", "allowed.test", GATEWAY, "A"]]
    checks += [["http_raw", REMOTE_V4, request] for request in attacks]
    internet.reset_logs()
    results, _ = probe(
        kapsis, project, checks, "--config", str(config(tmp_path, internet)),
        "--allow", "allowed.test",
    )  # fmt: skip
    requests = {request.path: request for request in internet.http_requests()}
    assert results[1]["statuses"] == [403] and "/comma" not in requests
    assert results[2]["statuses"] == [403] and "/h2c" not in requests
    # Control: the listed Host passes, without the headers that would name another host.
    assert results[3]["statuses"] == [200]
    headers = {key.lower() for key in requests["/forwarded"].headers}
    assert not headers & {"x-forwarded-host", "forwarded"}


def test_another_protocol_to_an_allowlisted_name_is_refused(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    # Port 8080 of the test host speaks first (a banner): it carries no name.
    checks = [["resolve", "allowed.test", GATEWAY, "A"], ["tcp", REMOTE_V4, 8080]]
    results, _ = probe(
        kapsis, project, checks, "--config", str(config(tmp_path, internet)),
        "--allow", "allowed.test:8080",
    )  # fmt: skip
    assert failed(results[1]) or "8080" not in results[1].get("banner", "")
    assert all(c.port != 8080 for c in internet.connections())
    # Control: as an address rule the same port is reachable (no proxy for addresses).
    results, _ = probe(
        kapsis, project, checks[1:], "--config", str(config(tmp_path, internet)),
        "--allow", f"{REMOTE_V4}:8080",
    )  # fmt: skip
    assert "8080" in results[0]["banner"]


# ---------------------------------------------------------------------------------------------
# DNS narrowed


def test_unlisted_query_types_and_long_labels_are_not_forwarded(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    internet.reset_logs()
    long_label = "q" * 60
    checks = [
        ["resolve", "allowed.test", GATEWAY, "TXT"],
        ["resolve", "allowed.test", GATEWAY, "MX"],
        ["resolve", f"{long_label}.allowed.test", GATEWAY, "A"],
        ["resolve", "allowed.test", GATEWAY, "A"],
        ["resolve", "allowed.test", GATEWAY, "AAAA"],
        ["resolve", "sub.allowed.test", GATEWAY, "A"],
    ]
    results, run = probe(
        kapsis, project, checks, "--config", str(config(tmp_path, internet)),
        "--allow", "allowed.test", "--allow", "*.allowed.test", "--agent-id", "dns1",
    )  # fmt: skip
    assert [r["rcode"] for r in results[:3]] == [5, 5, 5]  # REFUSED
    assert results[3]["addresses"] == [REMOTE_V4] and results[5]["addresses"] == [REMOTE_V4]
    forwarded = [(q.qtype, q.name) for q in internet.dns_queries()]
    assert ("A", "allowed.test") in forwarded and ("AAAA", "allowed.test") in forwarded
    assert not any(qtype in ("TXT", "MX") for qtype, _ in forwarded)
    assert not any(long_label in name for _, name in forwarded)
    refused = [e for e in network_log(kapsis, "dns1") if e.get("decision") == "refused"]
    assert {(e["qtype"], e["reason"]) for e in refused} == {
        ("TXT", "query type not allowed"),
        ("MX", "query type not allowed"),
        ("A", "a label too long or not of hostname characters"),
    }
    assert kapsis.status("dns1")["blocked_requests"] >= 3
    assert "allowed.test TXT (query type not allowed)" in run.stderr
    # Control: the upstream answers a TXT query when asked directly (open mode).
    opened, _ = probe(
        kapsis, project, [["resolve", "allowed.test", REMOTE_V4, "TXT"]], "--network-mode", "open"
    )
    assert opened[0]["rcode"] == 0
    assert ("TXT", "allowed.test") in [(q.qtype, q.name) for q in internet.dns_queries()]


def test_configured_query_types_and_the_query_rate(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    extra = "  dns:\n    query_types: [TXT]\n    max_queries_per_second: 5\n"
    cfg = config(tmp_path, internet, extra=extra)
    checks = [["resolve", "allowed.test", GATEWAY, "TXT"]] + [
        ["resolve", f"n{i}.allowed.test", GATEWAY, "A"] for i in range(60)
    ]
    results, _ = probe(
        kapsis, project, checks, "--config", str(cfg), "--allow", "*.allowed.test",
        "--allow", "allowed.test", "--agent-id", "rate1",
    )  # fmt: skip
    assert results[0]["rcode"] == 0  # TXT, listed in the config
    rcodes = [r.get("rcode") for r in results[1:]]
    assert rcodes.count(5) >= 30  # a burst of 20, then 5 a second
    assert rcodes.count(3) >= 10  # the first ones were forwarded (and are unknown upstream)
    reasons = {e.get("reason") for e in network_log(kapsis, "rate1")}
    assert "over the query rate" in reasons


def test_a_listed_name_the_upstream_cannot_resolve_is_reported_as_such(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    results, run = probe(
        kapsis, project, [["resolve", "missing.test", GATEWAY, "A"]],
        "--config", str(config(tmp_path, internet)), "--allow", "missing.test",
        "--agent-id", "miss1",
    )  # fmt: skip
    assert results[0]["rcode"] == 3
    assert "missing.test" in [q.name for q in internet.dns_queries()]  # it was asked
    entry = next(e for e in network_log(kapsis, "miss1") if e.get("name") == "missing.test")
    assert entry["decision"] == "unresolved"
    assert "the upstream could not resolve missing.test" in run.stderr
    assert "refused" not in run.stderr
    assert kapsis.status("miss1")["blocked_requests"] == 0
