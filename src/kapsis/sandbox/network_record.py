"""After a filtered run: read what the gateway decided, record it, and say it in the notes.

The gateway's logs (resolver, DNS front, proxy) and the firewall's counters are parsed by
:mod:`kapsis.network.observe`; this module writes the agent's network log, puts every decision
into the audit chain as the gateway's, updates ``blocked_requests`` and returns the notes of the
end-of-run message.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

from kapsis.audit import AuditLog
from kapsis.backends import Backend
from kapsis.network.gateway_config import probe_address
from kapsis.network.gateway_files import gateway_dirs
from kapsis.network.gateway_layout import DNS_FRONT_SOURCE
from kapsis.network.observe import (
    NetworkReport,
    api_notes,
    parse_dns_log,
    parse_dns_refusals,
    parse_proxy_log,
    proxy_without_selftest,
    report_notes,
    without_selftest,
    write_network_log,
)
from kapsis.sandbox.plan import SandboxPlan
from kapsis.secrets.redact import Redactor
from kapsis.status import StatusStore


def record_network(
    plan: SandboxPlan, backend: Backend, store: StatusStore, audit: AuditLog, redactor: Redactor
) -> tuple[list[str], bool]:
    """Record what the gateway allowed and refused; the notes for the run, and whether the
    gateway lasted the run."""
    blocked, gateway_ran = backend.blocked_connections(plan)
    dirs = gateway_dirs(Path(plan.workspace.root))
    cut: list[str] = []  # the logs read only in part
    read = _LogReader(cut)
    dns = parse_dns_log(read(dirs.dns_log), clients=(DNS_FRONT_SOURCE,))
    refusals, unrecorded = parse_dns_refusals(
        read(dirs.dns_refused_log), read(dirs.dns_refused_counts)
    )
    dns, blocked = without_selftest(dns + refusals, blocked, probe_address(plan.network.policy))
    proxy = [
        replace(decision, name=redactor.text(decision.name))
        for decision in proxy_without_selftest(parse_proxy_log(read(dirs.proxy_log)))
    ]
    for event in dns:  # a name the agent looked up may spell a secret out
        event.name = redactor.text(event.name)
    report = NetworkReport(
        dns=dns,
        blocked=blocked,
        gateway_ran_to_the_end=gateway_ran,
        proxy=proxy,
        dns_refused_unrecorded=unrecorded,
    )
    log = write_network_log(plan.agent_id, report)
    # Every decision of the gateway also goes into the audit chain, stamped as the gateway's.
    for event in dns:
        audit.record(
            "dns_query",
            source="gateway",
            name=event.name,
            qtype=event.qtype,
            decision=event.decision,
            answers=event.answers,
            **({"reason": event.reason} if event.reason else {}),
        )
    for decision in proxy:
        audit.record(
            "connection" if decision.allowed else "connection_blocked",
            source="gateway",
            name=decision.name,
            address=decision.address,
            protocol=decision.protocol or "tcp",
            port=decision.port,
            **({"reason": decision.reason} if decision.reason else {}),
        )
    for entry in blocked:
        audit.record(
            "connection_blocked",
            source="gateway",
            address=entry.address,
            protocol=entry.protocol,
            port=entry.port,
            attempts=entry.packets,
        )
    store.update(plan.agent_id, blocked_requests=report.blocked_requests)
    audit.record(
        "network_summary",
        dns_queries=len(dns),
        blocked_requests=report.blocked_requests,
        gateway_ran_to_the_end=report.gateway_ran_to_the_end,
        log=str(log),
    )
    notes = api_notes(report, model_api_hosts(plan))
    if report.blocked_requests:
        notes.append(f"the gateway refused {report.blocked_requests} request(s); see {log}")
    notes += report_notes(report)
    if cut:
        audit.record("network_log_cut", source="gateway", logs=cut, limit=MAX_GATEWAY_LOG_BYTES)
        notes.append(
            f"the gateway's {', '.join(cut)} went past {MAX_GATEWAY_LOG_BYTES >> 20} MiB: only "
            "the decisions before that point are recorded"
        )
    return notes, gateway_ran


def model_api_hosts(plan: SandboxPlan) -> list[str]:
    """The model API's hosts: the profile's and agent.endpoint's (by where they came from)."""
    return [
        rule.pattern
        for rule in plan.network.policy.rules
        if any(source.startswith(("agent profile", "agent.endpoint")) for source in rule.sources)
    ]


def model_api_notes_so_far(plan: SandboxPlan, limit: int) -> list[str]:
    """While the run goes on: the model API hosts the gateway could not serve yet, from the
    first ``limit`` bytes of each of its logs (they grow while they are read: a line cut at
    the end is skipped as malformed)."""
    dirs = gateway_dirs(Path(plan.workspace.root))
    read = _LogReader([], limit)
    dns = parse_dns_log(read(dirs.dns_log), clients=(DNS_FRONT_SOURCE,))
    refusals, _ = parse_dns_refusals(read(dirs.dns_refused_log))
    proxy = proxy_without_selftest(parse_proxy_log(read(dirs.proxy_log)))
    return api_notes(
        NetworkReport(dns=dns + refusals, blocked=[], proxy=proxy), model_api_hosts(plan)
    )


# The gateway's logs are bounded by the gateway itself; this bounds what the host reads of each.
MAX_GATEWAY_LOG_BYTES = 16 << 20


class _LogReader:
    """Reads a gateway log as text: a regular file only (never through a symlink, never blocking
    on a pipe), at most ``limit`` bytes; the names of the logs cut go to ``cut``."""

    def __init__(self, cut: list[str], limit: int | None = None) -> None:
        self.cut = cut
        self.limit = MAX_GATEWAY_LOG_BYTES if limit is None else limit

    def __call__(self, path: Path) -> str:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return ""
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return ""
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(self.limit + 1)
        if len(data) > self.limit:
            self.cut.append(path.name)
            data = data[: data.rfind(b"\n", 0, self.limit) + 1]
        return data.decode("utf-8", errors="replace")
