"""`kapsis policy show` and the network part of `kapsis run --dry-run`, driven in-process.

Every test passes a config with network.dns_servers, so the host's resolv.conf never matters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kapsis.cli.app import app
from kapsis.network.policy import load_category
from kapsis.sandbox.network_plan import DEFAULT_GATEWAY_IMAGE

WIDE = {"COLUMNS": "300"}  # rich tables: one row per line, nothing wrapped


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(autouse=True)
def no_real_runs(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a unit test reached a real launch")

    monkeypatch.setattr("kapsis.api.run", refuse)
    monkeypatch.setattr("kapsis.sandbox.launcher.launch", refuse)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "net.yaml"
    path.write_text(
        "network:\n"  # 1
        "  dns_servers: [198.51.100.53, '2001:db8::53']\n"  # 2
        "  allowlist:\n"  # 3
        "    hosts:\n"  # 4
        "      - pypi.org\n"  # 5
        "      - github.com:22\n"  # 6
        "    categories: [git-hosts]\n"  # 7
        "    addresses:\n"  # 8
        "      - '[2001:db8::7]:8443'\n"  # 9
    )
    return path


def _one_error_line(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kapsis: error: ")
    return lines[0]


def _policy_show(runner, project, config, *args):
    return runner.invoke(
        app, ["policy", "show", str(project), "--config", str(config), *args], env=WIDE
    )


# ---------------------------------------------------------------------------------------------
# policy show --json


def test_policy_show_json_lists_entries_with_sources(runner, project, config):
    result = _policy_show(
        runner, project, config, "--json", "--agent", "claude",
        "--allow", "example.org", "--allow", "203.0.113.9:22", "--allow", "pypi.org:8080",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["mode"] == "filtered"
    assert shown["dns_servers"] == ["198.51.100.53", "2001:db8::53"]
    assert shown["podman_network"] == "podman"
    assert len(shown["blocked"]) == 7
    # The proxy's rules: per destination port, the names a connection may carry.
    proxy = {rule["port"]: rule for rule in shown["proxy"]}
    assert set(proxy) == {22, 80, 443, 8080}
    assert proxy[22] == {"port": 22, "names": ["github.com"], "wildcards": []}
    assert proxy[8080]["names"] == ["pypi.org"]
    assert {"pypi.org", "github.com", "example.org", "api.anthropic.com"} <= set(
        proxy[443]["names"]
    )
    assert shown["dns"] == {
        "query_types": ["A", "AAAA", "CNAME", "HTTPS", "SVCB"],
        "max_label_length": 40,
        "max_queries_per_second": 50,
    }
    allowed = {rule["pattern"]: rule for rule in shown["allowed"]}
    assert allowed["pypi.org"] == {
        "pattern": "pypi.org",
        "kind": "name",
        "ports": [80, 443, 8080],
        "sources": [f"{config}:5", "flag --allow"],
    }
    assert allowed["github.com"]["ports"] == [22, 80, 443]
    assert allowed["github.com"]["sources"] == [f"{config}:6", f"category git-hosts ({config}:7)"]
    assert allowed["2001:db8::7/128"] == {
        "pattern": "2001:db8::7/128",
        "kind": "address",
        "ports": [8443],
        "sources": [f"{config}:9"],
    }
    assert allowed["203.0.113.9/32"]["ports"] == [22]
    assert allowed["example.org"]["sources"] == ["flag --allow"]
    assert allowed["api.anthropic.com"]["sources"] == ["agent profile claude"]
    expected = set(h.partition(":")[0] for h in load_category("git-hosts").hosts)
    expected |= {"pypi.org", "2001:db8::7/128", "203.0.113.9/32", "example.org"}
    expected |= {"api.anthropic.com"}
    assert set(allowed) == expected
    assert [rule["pattern"] for rule in shown["allowed"]] == sorted(allowed)


@pytest.mark.parametrize("mode", ["open", "none"])
def test_policy_show_json_of_open_and_none_allows_nothing_listed(runner, project, config, mode):
    result = _policy_show(runner, project, config, "--json", "--network-mode", mode)

    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["mode"] == mode
    assert shown["allowed"] == []
    assert shown["dns_servers"] == []
    assert len(shown["blocked"]) == 1


# ---------------------------------------------------------------------------------------------
# policy show (table)


def test_policy_show_table_of_filtered(runner, project, config):
    result = _policy_show(runner, project, config, "--allow", "example.org")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "network mode: filtered"
    rows = {line.split("│")[1].strip(): line for line in lines if line.startswith("│")}
    assert {cell.strip() for cell in rows["pypi.org"].split("│")[1:-1]} == {
        "pypi.org", "name", "80, 443", f"{config}:5",
    }  # fmt: skip
    assert "22, 80, 443" in rows["github.com"]
    assert f"{config}:6; category git-hosts ({config}:7)" in rows["github.com"]
    assert "address" in rows["2001:db8::7/128"]
    assert "8443" in rows["2001:db8::7/128"]
    assert "flag --allow" in rows["example.org"]
    assert "resolver upstreams: 198.51.100.53, 2001:db8::53" in lines
    assert "Proxy: TLS server name or HTTP Host, per port" in result.stdout
    proxy_rows = [line for line in lines if line.startswith("│ 22 ")]
    assert proxy_rows and "github.com" in proxy_rows[0]
    assert (
        "DNS: query types A, AAAA, CNAME, HTTPS, SVCB; labels up to 40 characters; 50 queries a "
        "second"
    ) in lines
    blocked = lines[lines.index("blocked:") + 1 :]
    assert len(blocked) == 7
    assert blocked[0] == "  - every name not listed (the resolver answers NXDOMAIN)"


def test_policy_show_table_with_nothing_listed(runner, project, tmp_path):
    config = tmp_path / "empty.yaml"
    config.write_text("network:\n  dns_servers: [198.51.100.53]\n")

    result = _policy_show(runner, project, config)

    assert result.exit_code == 0, result.output
    assert "allowed: nothing (no hosts, categories or addresses listed)" in result.stdout
    assert "│" not in result.stdout


def test_policy_show_open_says_open(runner, project, config):
    result = _policy_show(runner, project, config, "--network-mode", "open")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "network mode: OPEN (unfiltered)",
        "blocked:",
        "  - nothing: the network is OPEN (unfiltered)",
    ]


def test_policy_show_none(runner, project, config):
    result = _policy_show(runner, project, config, "--network-mode", "none")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "network mode: none",
        "blocked:",
        "  - everything but loopback: the sandbox has no network interface",
    ]


def test_policy_show_defaults_to_the_current_directory(runner, config_dir):
    Path("agent-sandbox.yaml").write_text(
        "network:\n  dns_servers: [198.51.100.53]\n  allowlist:\n    hosts: [here.example]\n"
    )
    # The file is the project's own: it widens the allowlist only once trusted.
    refused = runner.invoke(app, ["policy", "show", "--json"], env=WIDE)
    assert refused.exit_code == 2, refused.output
    assert runner.invoke(app, ["trust"], env=WIDE).exit_code == 0

    result = runner.invoke(app, ["policy", "show", "--json"], env=WIDE)

    assert result.exit_code == 0, result.output
    allowed = json.loads(result.stdout)["allowed"]
    assert [rule["pattern"] for rule in allowed] == ["here.example"]
    assert allowed[0]["sources"][0].endswith("agent-sandbox.yaml:4")


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("flag", "detail"),
    [
        ("bad host!", "'bad host!' is not a host name; use name, *.domain or name:port"),
        ("10.0.0.0/33", "'10.0.0.0/33' is not an address"),
        ("example.org:0", "'example.org:0': the port must be between 1 and 65535"),
    ],
)
def test_policy_show_with_a_bad_allow_exits_2_with_one_line(runner, project, config, flag, detail):
    result = _policy_show(runner, project, config, "--allow", flag)

    assert result.exit_code == 2
    assert _one_error_line(result).startswith(f"kapsis: error: flag --allow: {detail}")
    assert result.stdout == ""


def test_policy_show_with_a_bad_config_names_file_and_line(runner, project, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("network:\n  allowlist:\n    hosts:\n      - 203.0.113.7\n")

    result = _policy_show(runner, project, config)

    assert result.exit_code == 2
    assert _one_error_line(result) == (
        f"kapsis: error: {config}:4: network.allowlist.hosts[0]: '203.0.113.7' is an address; "
        "list it under network.allowlist.addresses"
    )


def test_policy_show_with_a_bad_network_mode_exits_2(runner, project, config):
    result = _policy_show(runner, project, config, "--network-mode", "closed")

    assert result.exit_code == 2
    assert "network.mode" in _one_error_line(result)


# ---------------------------------------------------------------------------------------------
# run --dry-run


def _dry_run(runner, project, config, *args):
    result = runner.invoke(
        app,
        ["run", str(project), "-t", "make test", "--agent-id", "net1", "--dry-run",
         "--config", str(config), *args],
        env=WIDE,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def test_dry_run_in_filtered_mode_shows_the_gateway_and_the_agent_joining_it(
    runner, project, config
):
    payload = _dry_run(runner, project, config, "--allow", "example.org")

    plan = payload["plan"]
    assert plan["network"]["mode"] == "filtered"
    assert plan["network"]["gateway"] == {
        "image": DEFAULT_GATEWAY_IMAGE,
        "container_name": "kapsis-net1-gateway",
        "upstreams": ["198.51.100.53", "2001:db8::53"],
    }
    pod, gateway, agent = payload["commands"]
    assert pod[:3] == ["podman", "pod", "create"]
    root = plan["workspace"]["root"]
    assert gateway[:2] == ["podman", "run"]
    assert _values(gateway, "--name") == ["kapsis-net1-gateway"]
    assert _values(gateway, "--cap-drop") == ["ALL"]
    assert "NET_ADMIN" in _values(gateway, "--cap-add")
    assert "--read-only" in gateway
    assert _values(gateway, "--volume") == [
        f"{root}/gateway:/etc/kapsis-gateway:ro",
        f"{root}/gateway-log:/var/log/kapsis",
    ]
    assert _values(gateway, "--dns") == ["127.0.0.1"]
    assert gateway[-3:] == [
        DEFAULT_GATEWAY_IMAGE,
        "/bin/bash",
        "/etc/kapsis-gateway/entrypoint.sh",
    ]
    assert agent[:2] == ["podman", "run"]
    assert _values(agent, "--network") == ["container:kapsis-net1-gateway"]
    assert "NET_ADMIN" not in agent
    # Nothing of the gateway's is mounted into the agent.
    assert not [v for v in _values(agent, "--volume") if "gateway" in v]


def test_dry_run_uses_the_gateway_image_from_the_environment(runner, project, config, monkeypatch):
    monkeypatch.setenv("KAPSIS_GATEWAY_IMAGE", "localhost/gw:test")

    payload = _dry_run(runner, project, config)

    _pod, gateway, _agent = payload["commands"]
    assert gateway[-3] == "localhost/gw:test"
    assert payload["plan"]["network"]["gateway"]["image"] == "localhost/gw:test"


@pytest.mark.parametrize(("mode", "network"), [("none", "none"), ("open", "podman")])
def test_dry_run_without_filtering_has_no_gateway(runner, project, config, mode, network):
    payload = _dry_run(runner, project, config, "--network-mode", mode)

    assert payload["plan"]["network"]["gateway"] is None
    _pod, agent = payload["commands"]
    assert _values(agent, "--network") == [network]


def test_dry_run_with_a_bad_allow_exits_2_with_one_line(runner, project, config):
    result = runner.invoke(
        app,
        ["run", str(project), "-t", "x", "--dry-run", "--config", str(config),
         "--allow", "10.0.0.1:99999"],
    )  # fmt: skip

    assert result.exit_code == 2
    assert _one_error_line(result) == (
        "kapsis: error: flag --allow: '10.0.0.1:99999': "
        "the port must be a number between 1 and 65535"
    )
    assert result.stdout == ""
