"""The files a gateway container gets, and how the shipped entrypoint uses them."""

from __future__ import annotations

import shutil
import stat
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from kapsis.network.gateway_config import RESOLVER_UID, RESOLVER_USER, dnsmasq_config, nft_ruleset
from kapsis.network.gateway_files import (
    CONFIG_TARGET,
    DNS_LOG,
    LOG_TARGET,
    gateway_dirs,
    probe_address,
    write_gateway_files,
)
from kapsis.network.policy import PolicyBuilder

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
    assert dirs.verdict.parent == dirs.log
    assert dirs.verdict_detail.parent == dirs.log


def test_write_gateway_files_writes_the_rendered_config_and_the_shipped_scripts(tmp_path):
    policy = _policy("192.0.2.0/24")
    dirs = gateway_dirs(tmp_path / "sb")

    write_gateway_files(dirs, policy, ("192.0.2.53",), owner=None)

    files = {path.name: path.read_text() for path in dirs.config.iterdir()}
    assert files == {
        "rules.nft": nft_ruleset(policy, ("192.0.2.53",)),
        "dnsmasq.conf": dnsmasq_config(policy, ("192.0.2.53",), f"{LOG_TARGET}/{DNS_LOG}"),
        "probe-address": "198.51.100.1\n",  # 192.0.2.1 is allowlisted
        "entrypoint.sh": (SHIPPED / "entrypoint.sh").read_text(),
        "selftest.py": (SHIPPED / "selftest.py").read_text(),
        "report.py": (SHIPPED / "report.py").read_text(),
        "observe.py": (SHIPPED.parent / "observe.py").read_text(),
    }
    assert probe_address(policy) == "198.51.100.1"


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
    for name in ("rules.nft", "dnsmasq.conf", "selftest.py", "probe-address"):
        assert f'"$CONFIG/{name}"' in entrypoint
        assert (dirs.config / name).is_file()
    assert f"VERDICT={LOG_TARGET}/{dirs.verdict.name}" in entrypoint
    assert dirs.verdict_detail.name == f"{dirs.verdict.name}.out"
    # The firewall goes in before the resolver starts; a failure to load it ends the gateway.
    assert entrypoint.index("nft -f") < entrypoint.index("dnsmasq --keep-in-foreground")
    assert "set -eu" in entrypoint


def test_the_entrypoint_is_valid_sh():
    shell = shutil.which("sh")
    if shell is None:
        pytest.skip("no sh")

    result = subprocess.run(
        [shell, "-n", str(SHIPPED / "entrypoint.sh")], capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stderr


def test_the_gateway_image_has_the_resolver_user_the_firewall_and_dnsmasq_expect():
    containerfile = (
        Path(str(resources.files("kapsis.host"))) / "Containerfile.gateway"
    ).read_text()
    config = dnsmasq_config(_policy(), ("192.0.2.53",), "/x").splitlines()

    assert f"--uid {RESOLVER_UID} --gid nogroup" in containerfile
    assert f"--shell /usr/sbin/nologin {RESOLVER_USER}" in containerfile
    assert f"user={RESOLVER_USER}" in config
    assert "group=nogroup" in config
    for package in ("dnsmasq-base", "nftables"):
        assert package in containerfile


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
