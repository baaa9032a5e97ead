"""Human-readable output: status tables, the live watch, config with origins, checks."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kapsis.terminal import shown

if TYPE_CHECKING:
    from kapsis.agents import AgentProfile
    from kapsis.config.loader import LoadedConfig
    from kapsis.host.agent_images import ImageInfo
    from kapsis.host.requirements import Check
    from kapsis.sandbox.network_plan import NetworkPlan
    from kapsis.status import AgentStatus

PHASE_STYLES = {"complete": "green", "failed": "red", "running": "cyan"}


def cell(value: object, style: str = "") -> Text:
    """A table cell of text that may come from the sandbox: shown as it is, never read as rich
    markup (``[link=...]``, ``[/]``) and with its control characters escaped."""
    return Text(shown(str(value)), style=style)


def _push_cell(record: AgentStatus) -> Text:
    if record.pr_url:
        return cell(record.pr_url)
    styles = {"pushed": "green", "diverged": "red", "failed": "red"}
    if record.push_status == "not_requested":
        return Text("")
    return cell(record.push_status, styles.get(record.push_status, ""))


def status_table(records: Sequence[AgentStatus]) -> Table:
    table = Table(title="Kapsis agents", expand=False)
    for column in (
        "AGENT ID",
        "AGENT",
        "PHASE",
        "EXIT",
        "BRANCH",
        "COMMIT",
        "PUSH / PR",
        "NETWORK",
        "LIMITS",
        "ALERTS",
        "AGENT SAYS",
        "MESSAGE",
    ):
        table.add_column(column)
    for record in records:
        style = PHASE_STYLES.get(record.phase, "")
        phase = f"{record.phase} {record.progress}%"
        table.add_row(
            cell(record.agent_id),
            cell(record.agent),
            cell(phase, style),
            "" if record.exit_code is None else str(record.exit_code),
            cell(record.branch or ""),
            cell((record.commit_sha or "")[:12]),
            _push_cell(record),
            cell(record.network_mode) if record.network_mode != "open" else "[bold yellow]OPEN[/]",
            "enforced" if record.limits_enforced else "[bold red]NOT ENFORCED[/]",
            f"[bold red]{len(record.alerts)}[/]" if record.alerts else "",
            cell(_activity_cell(record)),
            cell(record.message),
        )
    return table


def _activity_cell(record: AgentStatus) -> str:
    """The agent-reported activity (its hooks), e.g. ``using_tool Write (3 tools)``."""
    activity = record.agent_reported
    if activity is None:
        return ""
    tool = f" {activity.last_tool}" if activity.last_tool else ""
    return f"{activity.state}{tool} ({activity.tool_uses} tools)"


def print_status(records: Sequence[AgentStatus]) -> None:
    console = Console()
    if not records:
        console.print("no agents")
        return
    console.print(status_table(records))


def watch_status(fetch: Callable[[], Sequence[AgentStatus]], interval: float = 1.0) -> None:
    from rich.live import Live

    try:
        with Live(status_table(fetch()), refresh_per_second=4) as live:
            while True:
                time.sleep(interval)
                live.update(status_table(fetch()))
    except KeyboardInterrupt:
        pass


def config_with_origins(loaded: LoadedConfig, problems: Sequence[object]) -> dict[str, Any]:
    values = loaded.config.model_dump(mode="json")
    leaves = [path for path, _ in _leaves(values, ())]
    origins = {".".join(map(str, path)): str(loaded.origin_of(path)) for path in leaves}
    trusted = {
        ".".join(map(str, path)): loaded.is_trusted(loaded.origin_of(path)) for path in leaves
    }
    sources = [
        {"path": str(source.path), "standing": source.standing, "sha256": source.sha256}
        for source in loaded.sources
    ]
    return {
        "config": values,
        "origins": origins,
        "trusted": trusted,
        "files": [str(p) for p in loaded.files],
        "sources": sources,
        "needs_trust": [str(problem) for problem in problems],
    }


def _leaves(value: Any, prefix: tuple[str | int, ...]) -> list[tuple[tuple[str | int, ...], Any]]:
    if isinstance(value, dict) and value:
        return [leaf for key, item in value.items() for leaf in _leaves(item, (*prefix, key))]
    return [(prefix, value)]


def print_config(loaded: LoadedConfig, problems: Sequence[object]) -> None:
    table = Table(title="Effective configuration", expand=False)
    table.add_column("KEY")
    table.add_column("VALUE")
    table.add_column("FROM")
    table.add_column("TRUSTED")
    values = loaded.config.model_dump(mode="json")
    for path, value in _leaves(values, ()):
        origin = loaded.origin_of(path)
        # Config files are the agent's to edit: their text is shown as text, never as markup.
        trusted = Text("yes") if loaded.is_trusted(origin) else Text("no", style="yellow")
        table.add_row(cell(".".join(map(str, path))), cell(value), cell(origin), trusted)
    Console().print(table)
    for problem in problems:
        print(shown(f"needs trust: {problem}"))


def print_profiles(profiles: Sequence[AgentProfile], images: Mapping[str, ImageInfo]) -> None:
    """``images`` is what podman has of each profile's image (keyed by profile name)."""
    table = Table(title="Agent profiles", expand=False)
    for column in ("NAME", "DESCRIPTION", "IMAGE", "CLI VERSION", "API HOSTS", "SOURCE"):
        table.add_column(column)
    for profile in profiles:
        info = images.get(profile.name)
        image = "-"
        if info is not None:
            short = info.name.removeprefix("localhost/").removesuffix(":latest")
            image = f"{short} " + ("[green]present[/]" if info.present else "[yellow]missing[/]")
        table.add_row(
            profile.name,
            profile.description,
            image,
            (info.version if info else None) or "-",
            ", ".join(profile.network.hosts) or "-",
            profile.source,
        )
    Console().print(table)


def print_checks(checks: Sequence[Check], image: str) -> None:
    console = Console()
    for check in checks:
        mark = (
            "[green]ok[/]"
            if check.ok
            else ("[red]FAIL[/]" if check.required else "[yellow]warn[/]")
        )
        console.print(f"{mark:>14}  {check.name}: {check.detail}")
        if not check.ok and check.fix:
            console.print(f"          fix: {check.fix}")
    console.print(f"image: {image}")


def policy_as_json(network: NetworkPlan) -> dict[str, Any]:
    policy = network.policy
    return {
        "mode": network.mode,
        "allowed": [rule.model_dump(mode="json") for rule in policy.rules]
        if network.mode == "filtered"
        else [],
        "dns_servers": list(policy.dns_servers),
        "podman_network": network.podman_network,
        "proxy": _proxy_rules(network) if network.mode == "filtered" else [],
        "dns": {
            "query_types": list(policy.allowed_query_types()),
            "max_label_length": policy.dns.max_label_length,
            "max_queries_per_second": policy.dns.max_queries_per_second,
        }
        if network.mode == "filtered"
        else None,
        "blocked": policy.blocked_summary(),
    }


def _proxy_rules(network: NetworkPlan) -> list[dict[str, Any]]:
    """What the gateway's proxy lets through, per destination port."""
    from kapsis.network.proxy import allowed_names, proxy_ports

    rules = []
    for port in proxy_ports(network.policy):
        names, suffixes = allowed_names(network.policy, port)
        rules.append({"port": port, "names": names, "wildcards": [f"*{s}" for s in suffixes]})
    return rules


def print_policy(network: NetworkPlan) -> None:
    console = Console()
    policy = network.policy
    mode = "[bold yellow]OPEN (unfiltered)[/]" if network.mode == "open" else network.mode
    console.print(f"network mode: {mode}")
    if network.mode == "filtered":
        table = Table(title="Allowed", expand=False)
        for column in ("HOST / ADDRESS", "KIND", "PORTS", "FROM"):
            table.add_column(column)
        for rule in policy.rules:
            table.add_row(
                rule.pattern,
                rule.kind,
                ", ".join(map(str, rule.ports)),
                "; ".join(rule.sources),
            )
        if policy.rules:
            console.print(table)
        else:
            console.print("allowed: nothing (no hosts, categories or addresses listed)")
        proxy = _proxy_rules(network)
        if proxy:
            table = Table(title="Proxy: TLS server name or HTTP Host, per port", expand=False)
            for column in ("PORT", "NAMES"):
                table.add_column(column)
            for port_rule in proxy:
                names = port_rule["names"] + port_rule["wildcards"]
                table.add_row(str(port_rule["port"]), ", ".join(names))
            console.print(table)
        console.print(f"resolver upstreams: {', '.join(policy.dns_servers)}")
        console.print(
            f"DNS: query types {', '.join(policy.allowed_query_types())}; labels up to "
            f"{policy.dns.max_label_length} characters; {policy.dns.max_queries_per_second} "
            "queries a second"
        )
    console.print("blocked:")
    for line in policy.blocked_summary():
        console.print(f"  - {line}")


def print_json_array(items: Iterable[Any]) -> None:
    """A JSON array, one item at a time: never the whole of a long stream in memory."""
    print("[", end="")
    for index, item in enumerate(items):
        print(("," if index else "") + "\n  " + json.dumps(item), end="")
    print("\n]")


def print_audit_raw(events: Iterable[dict[str, Any]]) -> None:
    """One tab-separated line per record, its detail as ``key=value`` pairs, every character as
    recorded (for scripts; ``--json`` gives the structure)."""
    for event in events:
        detail = ", ".join(f"{key}={value}" for key, value in (event.get("detail") or {}).items())
        fields = (event.get("seq"), event.get("ts"), event.get("source"), event.get("event_type"))
        print("\t".join(str(field) for field in fields) + "\t" + detail)


# The readable timeline is printed as tables of this many rows: a chain of any length is never
# held whole.
AUDIT_ROWS_PER_TABLE = 1000


def print_audit(events: Iterable[dict[str, Any]]) -> None:
    console = Console()
    table = _audit_table("Audit trail")
    for event in events:
        if table.row_count == AUDIT_ROWS_PER_TABLE:
            console.print(table)
            table = _audit_table(None)
        detail = event.get("detail") or {}
        if event.get("event_type") == "seal":
            text = f"signed head seq {detail.get('head_seq')} (key {detail.get('key_id')})"
        else:
            text = ", ".join(f"{key}={value}" for key, value in detail.items())
        source = str(event.get("source", ""))
        table.add_row(
            cell(event.get("seq")),
            cell(str(event.get("ts", ""))[11:23]),
            cell(source, "yellow" if source == "agent" else ""),
            cell(event.get("event_type")),
            cell(text),
        )
    console.print(table)


def _audit_table(title: str | None) -> Table:
    table = Table(title=title, expand=False)
    for column in ("SEQ", "TIME", "SOURCE", "EVENT", "DETAIL"):
        table.add_column(column)
    return table


def print_alerts(alerts: Sequence[dict[str, Any]]) -> None:
    console = Console()
    if not alerts:
        console.print("no alerts")
        return
    table = Table(title="Alerts", expand=False)
    for column in ("SEQ", "SEVERITY", "RULE", "WHAT", "EVIDENCE"):
        table.add_column(column)
    for alert in alerts:
        severity = alert.get("severity", "")
        table.add_row(
            cell(alert.get("seq")),
            cell(severity, "bold red" if severity == "high" else "yellow"),
            cell(alert.get("rule")),
            cell(alert.get("message")),
            cell(alert.get("evidence")),
        )
    console.print(table)
