"""The files a gateway container gets, and how the shipped entrypoint uses them."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from kapsis.network.firewall import nft_ruleset
from kapsis.network.gateway_config import gateway_config_files, probe_address
from kapsis.network.gateway_files import gateway_dirs, gateway_scripts, write_gateway_files
from kapsis.network.gateway_layout import (
    CONFIG_TARGET,
    DNS_FRONT_UID,
    DNS_FRONT_USER,
    DNS_LOG,
    DNS_REFUSED_COUNTS,
    DNS_REFUSED_LOG,
    LOG_TARGET,
    PROXY_LOG,
    PROXY_UID,
    PROXY_USER,
    RESOLVER_UID,
    RESOLVER_USER,
)
from kapsis.network.policy import PolicyBuilder
from kapsis.network.proxy import proxy_config
from kapsis.network.resolver import dnsmasq_config

SHIPPED = Path(str(resources.files("kapsis.network") / "gateway"))


def _policy(*addresses: str):
    builder = PolicyBuilder("filtered")
    builder.add_host("github.com", "test")
    for address in addresses:
        builder.add_address(address, "test")
    return builder.build(["192.0.2.53"])


def test_gateway_dirs_live_in_the_sandbox_dir(tmp_path):
    dirs = gateway_dirs(tmp_path / "sb")

    assert dirs.config == tmp_path / "sb" / "gateway"
    assert dirs.log == tmp_path / "sb" / "gateway-log"
    assert dirs.dns_log == tmp_path / "sb" / "gateway-log" / DNS_LOG
    assert dirs.dns_refused_log == dirs.log / DNS_REFUSED_LOG == dirs.log / "dns-refused.tsv"
    assert dirs.dns_refused_counts == dirs.log / DNS_REFUSED_COUNTS
    assert dirs.dns_refused_counts.name == "dns-refused.counts"
    assert dirs.proxy_log == dirs.log / PROXY_LOG == dirs.log / "proxy.log"
    assert dirs.verdict.parent == dirs.log
    assert dirs.verdict_detail.parent == dirs.log


def test_write_gateway_files_writes_the_rendered_config_and_the_shipped_scripts(tmp_path):
    policy = _policy("192.0.2.0/24")
    dirs = gateway_dirs(tmp_path / "sb")

    write_gateway_files(dirs, policy, ("192.0.2.53",), owner=None)

    files = {path.name: path.read_text() for path in dirs.config.iterdir()}
    assert files == gateway_config_files(policy, ("192.0.2.53",)) | gateway_scripts()
    assert sorted(files) == [
        "dnsdist.conf",
        "dnsmasq.conf",
        "entrypoint.sh",
        "haproxy.cfg",
        "observe.py",
        "probe-address",
        "proxy-443.domains",
        "proxy-443.names",
        "proxy-80.domains",
        "proxy-80.names",
        "proxy-ports",
        "report.py",
        "rules.nft",
        "selftest.py",
    ]
    assert files["rules.nft"] == nft_ruleset(policy, ("192.0.2.53",))
    assert files["dnsmasq.conf"] == dnsmasq_config(
        policy, ("192.0.2.53",), f"{LOG_TARGET}/{DNS_LOG}"
    )
    assert files["haproxy.cfg"] == proxy_config(policy, CONFIG_TARGET)
    assert files["probe-address"] == "198.51.100.1\n"  # 192.0.2.1 is allowlisted
    assert probe_address(policy) == "198.51.100.1"
    for name in ("entrypoint.sh", "selftest.py", "report.py"):
        assert files[name] == (SHIPPED / name).read_text()
    assert files["observe.py"] == (SHIPPED.parent / "observe.py").read_text()


def test_a_policy_without_names_gets_no_proxy_files(tmp_path):
    builder = PolicyBuilder("filtered")
    builder.add_address("192.0.2.0/24", "test")
    dirs = gateway_dirs(tmp_path / "sb")

    write_gateway_files(dirs, builder.build(["192.0.2.53"]), ("192.0.2.53",), owner=None)

    names = {path.name for path in dirs.config.iterdir()}
    assert "haproxy.cfg" not in names
    assert not any(name.startswith("proxy-") and name != "proxy-ports" for name in names)
    assert (dirs.config / "proxy-ports").read_text() == ""


def test_gateway_files_are_read_only_for_others_and_the_log_private(tmp_path):
    dirs = gateway_dirs(tmp_path / "sb")

    write_gateway_files(dirs, _policy(), ("192.0.2.53",), owner=None)

    assert stat.S_IMODE(dirs.config.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in dirs.config.iterdir()} == {0o644}
    assert stat.S_IMODE(dirs.log.stat().st_mode) == 0o700
    assert list(dirs.log.iterdir()) == []


def test_writing_again_replaces_the_files(tmp_path):
    dirs = gateway_dirs(tmp_path / "sb")
    write_gateway_files(dirs, _policy(), ("192.0.2.53",), owner=None)

    write_gateway_files(dirs, _policy("10.0.0.0/8"), ("198.51.100.53",), owner=None)

    rules = (dirs.config / "rules.nft").read_text()
    assert "198.51.100.53" in rules
    assert "192.0.2.53" not in rules
    assert "10.0.0.0/8 }" in rules


def test_the_entrypoint_uses_exactly_the_files_written(tmp_path):
    entrypoint = (SHIPPED / "entrypoint.sh").read_text()
    dirs = gateway_dirs(tmp_path / "sb")
    write_gateway_files(dirs, _policy(), ("192.0.2.53",), owner=None)

    assert f"CONFIG={CONFIG_TARGET}" in entrypoint
    assert f"LOGS={LOG_TARGET}" in entrypoint
    used = set(re.findall(r'"\$CONFIG/([^"]+)"', entrypoint))
    assert used == {
        "rules.nft",
        "dnsmasq.conf",
        "dnsdist.conf",
        "haproxy.cfg",
        "report.py",
        "selftest.py",
        "probe-address",
        "proxy-ports",
    }
    for name in used:
        assert (dirs.config / name).is_file(), name
    assert f"VERDICT=$LOGS/{dirs.verdict.name}" in entrypoint
    assert dirs.verdict_detail.name == f"{dirs.verdict.name}.out"
    # The logs the host reads are where the daemons write them.
    assert f'> "$LOGS/{dirs.proxy_log.name}"' in entrypoint
    assert f"for file in {DNS_REFUSED_LOG} {DNS_REFUSED_COUNTS}; do" in entrypoint
    # The firewall goes in before any daemon starts; a failure to load it ends the gateway.
    firewall = entrypoint.index('nft -f "$CONFIG/rules.nft"')
    for daemon in ("dnsmasq --keep-in-foreground", "dnsdist --supervised", "haproxy -db"):
        assert firewall < entrypoint.index(daemon), daemon
    assert "set -eu" in entrypoint


def test_the_entrypoint_runs_each_daemon_as_its_own_user():
    entrypoint = (SHIPPED / "entrypoint.sh").read_text()
    config = dnsmasq_config(_policy(), ("192.0.2.53",), "/x").splitlines()
    haproxy = proxy_config(_policy(), CONFIG_TARGET) or ""

    assert f"user={RESOLVER_USER}" in config  # dnsmasq drops to it by itself
    assert f"  uid {PROXY_UID}" in haproxy.splitlines()  # and HAProxy by its config
    front = entrypoint[: entrypoint.index("dnsdist --supervised")].rsplit("setpriv", 1)[1]
    assert f"--reuid={DNS_FRONT_USER}" in front  # dnsdist is started as its user
    # The self-test runs as none of them (the firewall treats it as it treats the agent).
    selftest = entrypoint[: entrypoint.index('"$CONFIG/selftest.py"')].rsplit("setpriv", 1)[1]
    assert "--reuid=65534" in selftest


def test_the_entrypoint_is_valid_bash_and_run_by_bash():
    """It uses arrays and ``wait -n``: bash, as its first line and the image's command say."""
    entrypoint = SHIPPED / "entrypoint.sh"
    containerfile = (
        Path(str(resources.files("kapsis.host"))) / "Containerfile.gateway"
    ).read_text()
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")

    result = subprocess.run(
        [bash, "-n", str(entrypoint)], capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stderr
    assert entrypoint.read_text().startswith("#!/bin/bash\n")
    assert f'CMD ["/bin/bash", "{CONFIG_TARGET}/entrypoint.sh"]' in containerfile


def test_the_gateway_image_has_the_users_and_the_programs_the_configuration_expects():
    containerfile = (
        Path(str(resources.files("kapsis.host"))) / "Containerfile.gateway"
    ).read_text()

    users = re.findall(
        r"useradd --system --uid (\d+) --gid nogroup .*?--shell /usr/sbin/nologin (\S+)",
        containerfile,
        re.DOTALL,
    )
    assert {(int(uid), name) for uid, name in users} == {
        (RESOLVER_UID, RESOLVER_USER),
        (PROXY_UID, PROXY_USER),
        (DNS_FRONT_UID, DNS_FRONT_USER),
    }
    for package in ("dnsmasq-base", "nftables", "haproxy", "dnsdist"):
        assert re.search(rf"\b{package}\b", containerfile), package


def test_the_base_image_has_python_for_the_self_test():
    from kapsis.host.image import INCLUDE

    assert "python3" in INCLUDE


def test_the_entrypoint_writes_its_verdict_in_one_step():
    # The host polls for the verdict file; a plain `echo ok > "$VERDICT"` creates it empty first.
    entrypoint = (SHIPPED / "entrypoint.sh").read_text()

    assert '> "$VERDICT"' not in entrypoint
    assert 'mv "$VERDICT.partial" "$VERDICT"' in entrypoint


def test_the_host_waits_out_a_verdict_file_that_is_still_empty(tmp_path):
    import threading

    from kapsis.backends.podman_gateway import _await_verdict

    dirs = gateway_dirs(tmp_path / "sb")
    dirs.log.mkdir(parents=True)
    dirs.verdict.touch()
    dirs.verdict_detail.write_text("resolver ok\n")
    writer = threading.Timer(0.2, dirs.verdict.write_text, args=("ok\n",))
    writer.start()
    try:
        assert _await_verdict(dirs, "no-such-container", timeout=1.5) is None
    finally:
        writer.cancel()


def test_the_host_reports_a_failed_verdict_with_the_self_test_output(tmp_path):
    from kapsis.backends.podman_gateway import _await_verdict

    dirs = gateway_dirs(tmp_path / "sb")
    dirs.log.mkdir(parents=True)
    dirs.verdict_detail.write_text("line 1\nunlisted name resolved: example.org\n")
    dirs.verdict.write_text("failed\n")

    assert _await_verdict(dirs, "no-such-container", timeout=1.5) == (
        "line 1; unlisted name resolved: example.org"
    )


def test_the_log_directory_is_given_to_the_gateways_root(tmp_path):
    """The resolver opens its log as the gateway's root (a host uid of the gateway's range)."""
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    dirs = gateway_dirs(tmp_path / "sb")

    write_gateway_files(dirs, _policy(), ("192.0.2.53",), owner=4242)

    assert (dirs.log.stat().st_uid, dirs.log.stat().st_gid) == (4242, 4242)
    assert {path.stat().st_uid for path in dirs.config.iterdir()} == {0}
