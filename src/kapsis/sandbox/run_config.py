"""The config a run uses: loaded, and refused when a project's own file sets what needs trust.

Both backends load through here, before anything is created: a value that came from a file the
agent can edit (the project's ``agent-sandbox.yaml`` or ``.kapsis/config.yaml``) and that would
run something on the host or widen the sandbox stops the run with exit 2 (see
:mod:`kapsis.config.trust`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kapsis.agents import find_profile
from kapsis.agents.profiles import AgentProfile
from kapsis.config import trust_store
from kapsis.config.loader import KeyPath, LoadedConfig, load_config
from kapsis.config.trust import require_trusted, trust_problems
from kapsis.network.policy import load_category

ALLOWLIST_HOSTS: KeyPath = ("network", "allowlist", "hosts")


def load_trusted_config(
    project: Path, config_file: Path | None, flags: Mapping[str, tuple[str, Any]]
) -> tuple[LoadedConfig, AgentProfile]:
    """The run's config and agent profile; UntrustedConfigError (exit 2) when it needs trust."""
    loaded = load_config(project, config_file, flags)
    profile = find_profile(loaded.config.agent.name)
    require_trusted(loaded, {ALLOWLIST_HOSTS: hosts_granted_anyway(loaded, profile)})
    return loaded, profile


def hosts_granted_anyway(loaded: LoadedConfig, profile: AgentProfile) -> frozenset[str]:
    """Hosts the run may reach whatever the project's files say: the agent profile's own and
    those of the categories the trusted sources chose. Listing them again widens nothing."""
    hosts = set(profile.network.hosts)
    for name in loaded.trusted_config.network.allowlist.categories:
        hosts |= set(load_category(name).hosts)
    return frozenset(hosts)


@dataclass(frozen=True)
class TrustReport:
    """A project config file that `kapsis trust` looked at."""

    path: Path
    sha256: str
    # The keys of it that need trust (file:line key: what it does).
    needs_trust: tuple[str, ...]
    # It was trusted already, as it is now.
    already: bool


def trust_project(project: Path) -> list[TrustReport]:
    """Trust the project's config files as they are now (and ./agent-sandbox.yaml).

    The hash recorded is of the very bytes that were parsed and judged, so a file changed
    in between is not trusted unseen.
    """
    loaded = load_config(project, None, {})
    profile = find_profile(loaded.config.agent.name)
    problems = trust_problems(loaded, {ALLOWLIST_HOSTS: hosts_granted_anyway(loaded, profile)})
    reports = []
    for source in loaded.sources:
        if source.standing not in ("untrusted", "trusted"):
            continue  # --config and the user's own config are trusted by role
        own = [problem for problem in problems if problem.origin.file == source.path]
        if source.standing == "untrusted":
            trust_store.trust(source.path, source.sha256, tuple(p.key for p in own))
        shown = tuple(str(problem) for problem in own)
        reports.append(TrustReport(source.path, source.sha256, shown, source.standing == "trusted"))
    return reports
