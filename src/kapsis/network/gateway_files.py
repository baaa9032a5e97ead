"""The files a gateway container gets, written on the host into the sandbox dir.

``gateway/`` (mounted read-only at ``/etc/kapsis-gateway``) holds the firewall rules, the
resolver's configuration, the entrypoint and the self-test; ``gateway-log/`` (mounted at
``/var/log/kapsis``, writable by the gateway only) receives the resolver's query log. Neither is
ever mounted into the agent's container.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

from kapsis.network.gateway_config import gateway_config_files
from kapsis.network.gateway_layout import (
    DNS_LOG,
    DNS_REFUSED_COUNTS,
    DNS_REFUSED_LOG,
    PROXY_LOG,
    VERDICT,
)
from kapsis.network.policy import NetworkPolicy


@dataclass(frozen=True)
class GatewayDirs:
    config: Path
    log: Path

    @property
    def dns_log(self) -> Path:
        return self.log / DNS_LOG

    @property
    def dns_refused_log(self) -> Path:
        return self.log / DNS_REFUSED_LOG

    @property
    def dns_refused_counts(self) -> Path:
        return self.log / DNS_REFUSED_COUNTS

    @property
    def proxy_log(self) -> Path:
        return self.log / PROXY_LOG

    @property
    def verdict(self) -> Path:
        """The self-test's verdict ("ok" or "failed"), written by the gateway's entrypoint."""
        return self.log / VERDICT

    @property
    def verdict_detail(self) -> Path:
        return self.log / f"{VERDICT}.out"


def gateway_dirs(sandbox_root: Path) -> GatewayDirs:
    return GatewayDirs(config=sandbox_root / "gateway", log=sandbox_root / "gateway-log")


def gateway_scripts() -> dict[str, str]:
    """The programs every gateway runs, by file name (the same on both backends): the
    entrypoint, the self-test, and the blocked-requests report with the parser it shares
    with the host."""
    network = importlib.resources.files("kapsis.network")
    scripts = {
        name: (network / "gateway" / name).read_text(encoding="utf-8")
        for name in ("entrypoint.sh", "selftest.py", "report.py")
    }
    scripts["observe.py"] = (network / "observe.py").read_text(encoding="utf-8")
    return scripts


def write_gateway_files(
    dirs: GatewayDirs, policy: NetworkPolicy, upstreams: tuple[str, ...], owner: int | None
) -> None:
    """Write the gateway's config; ``owner`` is the host uid of the gateway's root, if mapped."""
    dirs.config.mkdir(parents=True, exist_ok=True)
    dirs.log.mkdir(parents=True, exist_ok=True)
    for name, text in (gateway_config_files(policy, upstreams) | gateway_scripts()).items():
        (dirs.config / name).write_text(text)
    for path in dirs.config.iterdir():
        path.chmod(0o644)
    dirs.config.chmod(0o755)
    if owner is not None:
        # The resolver opens its log as the gateway's root: a host uid of the gateway's range.
        os.chown(dirs.log, owner, owner)
    dirs.log.chmod(0o700)
