"""The escape suite of filtered network mode, run against the test internet (see internet.py).

Every attack is made by an agent in a real sandbox. In ``filtered`` mode it must fail; the same
attack as a control (``open`` mode, or the target allowlisted) must succeed, so a failure proves
the filter and not a broken test. Traffic goes only to the test internet's addresses (documentation
ranges inside a network namespace this session creates) and to loopback: open-mode controls
address the test host by IP, never by name, so no query ever reaches a real resolver.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kapsis.errors import ExitCode

from .internet import REMOTE_V4, REMOTE_V6, Internet, probe_script
from .kapsis_runner import Kapsis
from .sandbox_probe import GATEWAY, config, failed, probe, probe_project


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return probe_project(tmp_path)


pytestmark = pytest.mark.integration

# ---------------------------------------------------------------------------------------------
# names


def test_an_allowlisted_name_resolves_and_is_reachable(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    internet.reset_logs()
    results, _run = probe(
        kapsis,
        project,
        [["resolve", "allowed.test", GATEWAY, "A"], ["http", "allowed.test", "/hello"]],
        "--config", str(config(tmp_path, internet)), "--allow", "allowed.test",
    )  # fmt: skip
    assert results[0] == {"rcode": 0, "addresses": [REMOTE_V4]}
    assert results[1]["status"] == 200
    assert [r.path for r in internet.http_requests()] == ["/hello"]
    assert internet.http_requests()[0].host == "allowed.test"


def test_a_name_not_on_the_list_is_nxdomain_and_never_forwarded(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    internet.reset_logs()
    results, _run = probe(
        kapsis,
        project,
        [["resolve", "other.test", GATEWAY, "A"], ["http", "other.test"]],
        "--config", str(config(tmp_path, internet)), "--allow", "allowed.test",
        "--agent-id", "nx1",
    )  # fmt: skip
    assert results[0] == {"rcode": 3, "addresses": []}
    assert failed(results[1])
    assert "other.test" not in [q.name for q in internet.dns_queries()]
    # Recorded: the refused name, in the agent's network log and counted in its status.
    log = [json.loads(line) for line in (kapsis.home / "network" / "nx1.jsonl").open()]
    assert {"name": "other.test", "decision": "blocked"}.items() <= log[0].items()
    assert kapsis.status("nx1")["blocked_requests"] >= 1
    # Control: listed, the same name resolves.
    results, _ = probe(
        kapsis,
        project,
        [["resolve", "other.test", GATEWAY, "A"]],
        "--config", str(config(tmp_path, internet)), "--allow", "other.test",
    )  # fmt: skip
    assert results[0] == {"rcode": 0, "addresses": [REMOTE_V4]}


def test_a_subdomain_needs_its_own_entry_or_a_wildcard(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    checks = [["resolve", "sub.allowed.test", GATEWAY, "A"]]
    cfg = str(config(tmp_path, internet))
    exact, _ = probe(kapsis, project, checks, "--config", cfg, "--allow", "allowed.test")
    wildcard, _ = probe(kapsis, project, checks, "--config", cfg, "--allow", "*.allowed.test")
    assert exact[0]["rcode"] == 3
    assert wildcard[0] == {"rcode": 0, "addresses": [REMOTE_V4]}


# ---------------------------------------------------------------------------------------------
# addresses, resolvers, ports, protocols


def test_a_direct_connection_to_an_address_is_refused(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    checks = [["http", REMOTE_V4], ["tcp", REMOTE_V4, 8080]]
    filtered, _ = probe(
        kapsis, project, checks, "--config", str(config(tmp_path, internet)),
        "--allow", "allowed.test",
    )  # fmt: skip
    opened, _ = probe(kapsis, project, checks, "--network-mode", "open")
    assert all(failed(outcome) for outcome in filtered)
    assert opened[0]["status"] == 200 and "8080" in opened[1]["banner"]


def test_an_allowlisted_address_and_port_are_reachable_and_only_that_port(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    results, _ = probe(
        kapsis,
        project,
        [["tcp", REMOTE_V4, 8080], ["tcp", REMOTE_V4, 22], ["http", REMOTE_V4]],
        "--config", str(config(tmp_path, internet)), "--allow", f"{REMOTE_V4}:8080",
    )  # fmt: skip
    assert "8080" in results[0]["banner"]
    assert failed(results[1]) and failed(results[2])


def test_other_resolvers_are_unreachable_over_udp_and_tcp(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    checks = [
        ["resolve", "allowed.test", REMOTE_V4, "A"],
        ["resolve", "allowed.test", REMOTE_V4, "A", "tcp"],
    ]
    internet.reset_logs()
    filtered, _ = probe(
        kapsis, project, checks, "--config", str(config(tmp_path, internet)),
        "--allow", "allowed.test",
    )  # fmt: skip
    assert all(failed(outcome) for outcome in filtered)
    assert internet.dns_queries() == []
    opened, _ = probe(kapsis, project, checks, "--network-mode", "open")
    assert all(outcome.get("addresses") == [REMOTE_V4] for outcome in opened)


@pytest.mark.parametrize("name", ["rebind.test", "loop.test", "meta.test"])
def test_dns_rebinding_to_private_loopback_or_metadata_addresses_is_refused(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path, name: str
) -> None:
    filtered, _ = probe(
        kapsis, project, [["resolve", name, GATEWAY, "A"]],
        "--config", str(config(tmp_path, internet)), "--allow", name,
    )  # fmt: skip
    assert filtered[0].get("addresses", []) == []
    # Control: the test DNS server does give the non-public answer.
    opened, _ = probe(
        kapsis, project, [["resolve", name, REMOTE_V4, "A"]], "--network-mode", "open"
    )
    assert opened[0]["addresses"] == list(internet.names[name])


def test_udp_egress_is_refused(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    checks = [["udp", REMOTE_V4, 9999, "hello"]]
    filtered, _ = probe(
        kapsis, project, checks, "--config", str(config(tmp_path, internet)),
        "--allow", REMOTE_V4,  # the address is allowed, for TCP; UDP stays refused
    )  # fmt: skip
    opened, _ = probe(kapsis, project, checks, "--network-mode", "open")
    assert failed(filtered[0])
    assert opened[0] == {"reply": "hello"}


def test_icmp_egress_is_dropped_even_with_raw_sockets(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    # An agent runs as uid 1000 and cannot open raw sockets at all; a root process with
    # CAP_NET_RAW in the sandbox's network namespace shows the firewall stops ICMP by itself.
    cfg = str(config(tmp_path, internet))
    started = kapsis.run(
        project, "sleep 30", "--config", cfg, "--allow", REMOTE_V4, "--detach",
        "--agent-id", "icmp1",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    ping = ["python3", "-c", probe_script(), json.dumps([["ping", REMOTE_V4]])]
    raw = ["podman", "run", "--rm", "--cap-drop", "ALL", "--cap-add", "NET_RAW", "--user", "0"]
    try:
        inside = subprocess.run(
            [*raw, "--pod", "kapsis-icmp1", "--network", "container:kapsis-icmp1-gateway",
             "localhost/kapsis-base:latest", *ping], capture_output=True, text=True, check=False,
        )  # fmt: skip
        outside = subprocess.run(
            [*raw, "--network", "bridge", "localhost/kapsis-base:latest", *ping],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    finally:
        kapsis("stop", "icmp1")
        kapsis.wait_finished("icmp1")
    assert json.loads(inside.stdout)[0].get("reply") is not True, inside.stderr
    assert json.loads(outside.stdout)[0] == {"reply": True}, outside.stderr


# A fresh interface's IPv6 address is unusable until duplicate address detection is over.
WAIT_FOR_IPV6 = (
    "for i in $(seq 1 50); do awk '$5 ~ /4.$/ {t=1} END {exit t}' /proc/net/if_inet6 && break; "
    "sleep 0.1; done; "
)


def probe_v6(
    kapsis: Kapsis, project: Path, checks: list[list[Any]], *flags: str
) -> list[dict[str, Any]]:
    task = f"{WAIT_FOR_IPV6}python3 /workspace/probe.py '{json.dumps(checks)}'"
    result = kapsis.run(project, task, *flags)
    assert result.returncode == 0, result.stderr
    outcome: list[dict[str, Any]] = json.loads(result.stdout.strip().splitlines()[-1])
    return outcome


def test_ipv6_is_filtered_like_ipv4(
    kapsis: Kapsis, project: Path, internet: Internet, podman_v6_network: str, tmp_path: Path
) -> None:
    cfg = str(config(tmp_path, internet, podman_v6_network))
    direct = [["http", REMOTE_V6], ["resolve", "allowed.test", REMOTE_V6, "AAAA"]]
    filtered = probe_v6(kapsis, project, direct, "--config", cfg, "--allow", "allowed.test")
    assert all(failed(outcome) for outcome in filtered)
    opened = probe_v6(kapsis, project, direct, "--config", cfg, "--network-mode", "open")
    assert opened[0]["status"] == 200 and opened[1]["addresses"] == [REMOTE_V6]
    # The allowlisted name reaches the same host over IPv6 once the gateway resolved it, through
    # the proxy: by its name only, not by its address.
    via_name = probe_v6(
        kapsis, project,
        [["resolve", "allowed.test", GATEWAY, "AAAA"], ["http", REMOTE_V6, "/", 80, "allowed.test"],
         ["http", REMOTE_V6, "/", 80, "other.test"], ["https", REMOTE_V6, "/", "allowed.test"],
         ["https", REMOTE_V6, "/", "other.test"]],
        "--config", cfg, "--allow", "allowed.test",
    )  # fmt: skip
    assert via_name[0]["addresses"] == [REMOTE_V6]
    assert via_name[1]["status"] == 200 and via_name[3]["status"] == 200
    assert via_name[2]["status"] == 403 and failed(via_name[4])


# ---------------------------------------------------------------------------------------------
# attacks on the gateway from inside the sandbox


def test_the_agent_cannot_change_the_rules_even_with_net_admin(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    # The gateway image has nft and ip; an agent can bring any tool. It even gets CAP_NET_ADMIN
    # here - in its own user namespace, which does not own the gateway's network namespace.
    attack = (
        "nft flush ruleset; echo flush=$?; ip route del default; echo route=$?; "
        f"pkill -9 dnsmasq; echo kill=$?; echo nameserver {REMOTE_V4} > /etc/resolv.conf; "
        'echo resolv=$?; python3 /workspace/probe.py \'[["resolve", "allowed.test", '
        f'"{GATEWAY}", "A"], ["http", "{REMOTE_V4}", "/after", 80, "allowed.test"]]\''
    )
    cfg = config(tmp_path, internet, extra="security:\n  overrides:\n    cap_add: [NET_ADMIN]\n")
    flags = ["--config", str(cfg), "--image", "localhost/kapsis-gateway:latest"]
    result = kapsis.run(project, attack, *flags, "--allow", "allowed.test")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    codes = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("["))
    # Every attempt failed (the exact codes depend on the tool and the shell).
    assert {codes[k] for k in ("flush", "route", "kill", "resolv")} <= {"1", "2"}, result.stdout
    after = json.loads(lines[-1])
    assert after[0] == {"rcode": 0, "addresses": [REMOTE_V4]}  # the resolver still runs
    # REMOTE_V4 was just resolved from an allowed name, so it is reachable on port 80 now:
    # the rules are intact (not flushed, which would also have allowed it, see the control).
    assert after[1]["status"] == 200
    # Control: with the same capability in open mode the agent owns its namespace and can.
    control = kapsis.run(
        project, "nft flush ruleset; echo flush=$?", "--network-mode", "open", *flags
    )
    assert "flush=0" in control.stdout.splitlines(), control.stderr


def test_another_uid_gets_no_way_past_the_resolver_rule(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    cfg = str(config(tmp_path, internet))
    started = kapsis.run(project, "sleep 30", "--config", cfg, "--detach", "--agent-id", "uid1")
    assert started.returncode == 0, started.stderr
    gateway = "kapsis-uid1-gateway"
    check = ["python3", "-c", probe_script(), json.dumps([["resolve", "allowed.test",
                                                            REMOTE_V4, "A"]])]  # fmt: skip
    try:
        # An agent-side process running as the resolver's uid number (990) in its own range.
        as_990 = subprocess.run(
            ["podman", "run", "--rm", "--pod", "kapsis-uid1", "--network", f"container:{gateway}",
             "--uidmap", "0:1900000000:65536", "--gidmap", "0:1900000000:65536",
             "--user", "990:990", "--cap-drop", "ALL", "localhost/kapsis-base:latest", *check],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert failed(json.loads(as_990.stdout)[0]), as_990.stderr
        # Control: the resolver's real uid (inside the gateway) does reach the upstream.
        real = subprocess.run(
            ["podman", "exec", "--user", "990:65534", gateway, *check],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert json.loads(real.stdout)[0]["addresses"] == [REMOTE_V4], real.stderr
    finally:
        kapsis("stop", "uid1")
        kapsis.wait_finished("uid1")


# ---------------------------------------------------------------------------------------------
# failing closed


def test_a_gateway_that_cannot_load_its_rules_means_no_run(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    # The base image has neither nft nor dnsmasq: the gateway cannot come up.
    result = kapsis.run(
        project, "touch /workspace/agent-ran", "--config", str(config(tmp_path, internet)),
        "--json", env={"KAPSIS_GATEWAY_IMAGE": "localhost/kapsis-base:latest"},
    )  # fmt: skip
    assert result.returncode == ExitCode.SANDBOX_FAILED
    outcome = json.loads(result.stdout)
    assert "network gateway failed its self-test" in outcome["message"]
    # The agent never ran: nothing of its reached the audit trail.
    events = json.loads(kapsis("audit", "show", outcome["agent_id"], "--json").stdout)
    assert "sandbox_started" not in [event["event_type"] for event in events]


def test_a_gateway_that_dies_leaves_the_agent_without_network(
    kapsis: Kapsis, project: Path, internet: Internet, tmp_path: Path
) -> None:
    loop = (
        "for i in $(seq 1 30); do python3 /workspace/probe.py "
        f'\'[["tcp", "{REMOTE_V4}", 8080]]\' >> /tmp/log; sleep 0.3; done; cat /tmp/log'
    )
    cfg = str(config(tmp_path, internet))
    started = kapsis.run(
        project, loop, "--config", cfg, "--allow", f"{REMOTE_V4}:8080", "--detach",
        "--agent-id", "die1",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    time.sleep(3)
    subprocess.run(["podman", "kill", "kapsis-die1-gateway"], capture_output=True, check=True)
    record = kapsis.wait_finished("die1", timeout=90)
    outcomes = [json.loads(line)[0] for line in kapsis("logs", "die1").stdout.splitlines()
                if line.startswith("[")]  # fmt: skip
    assert any("banner" in o for o in outcomes), "the address was reachable before"
    assert failed(outcomes[-1]), "and unreachable once the gateway was gone"
    assert record["phase"] == "failed" and record["error_type"] == "gateway"
    assert record["exit_code"] == 3 and "network gateway stopped" in record["message"]
    assert kapsis("audit", "verify", "die1").returncode == 0
    gone = subprocess.run(["podman", "pod", "exists", "kapsis-die1"], check=False)
    assert gone.returncode != 0
