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
from kapsis.config.trust import Resolver, TrustProblem, require_trusted, trust_problems
from kapsis.network.policy import load_category
from kapsis.sandbox.security import PROFILES

ALLOWLIST_HOSTS: KeyPath = ("network", "allowlist", "hosts")
AGENT_NAME: KeyPath = ("agent", "name")
PIDS: KeyPath = ("resources", "pids")


def load_trusted_config(
    project: Path, config_file: Path | None, flags: Mapping[str, tuple[str, Any]]
) -> tuple[LoadedConfig, AgentProfile]:
    """The run's config and agent profile; UntrustedConfigError (exit 2) when it needs trust."""
    loaded = load_config(project, config_file, flags)
    profile = find_profile(loaded.config.agent.name)
    require_trusted(loaded, *_context(loaded, profile))
    return loaded, profile


def needs_trust(loaded: LoadedConfig) -> list[TrustProblem]:
    """What of ``loaded`` needs trust, judged as a run would (for `kapsis config show`)."""
    return trust_problems(loaded, *_context(loaded, find_profile(loaded.config.agent.name)))


def _context(
    loaded: LoadedConfig, profile: AgentProfile
) -> tuple[dict[KeyPath, frozenset[Any]], dict[KeyPath, Resolver]]:
    """What the markers need to know beyond the config: the hosts a run gets anyway, whether
    the chosen agent profile gets more than the trusted one, what ``pids: null`` stands for."""
    trusted_profile = find_profile(loaded.trusted_config.agent.name)
    reach = set(trusted_profile.network.hosts) | set(loaded.trusted_config.network.allowlist.hosts)
    no_more = _handed_over(profile) <= _handed_over(trusted_profile) and _hosts(
        profile
    ) <= reach | hosts_granted_anyway(loaded, trusted_profile) | _hosts(trusted_profile)
    extra: dict[KeyPath, frozenset[Any]] = {
        ALLOWLIST_HOSTS: hosts_granted_anyway(loaded, profile),
        AGENT_NAME: frozenset({profile.name} if no_more else ()),
    }
    return extra, {PIDS: _pids_limit}


def _handed_over(profile: AgentProfile) -> set[str]:
    """Every host variable a run of ``profile`` may read a secret from: its secrets, the
    variables they may come from, and its subscription login."""
    names = set(profile.secrets)
    for sources in profile.secret_sources.values():
        names |= set(sources)
    if profile.login is not None:
        names.add(profile.login.secret)
    return names


def _hosts(profile: AgentProfile) -> set[str]:
    """Every host a run of ``profile`` may be allowed: its own, and its login's."""
    return set(profile.network.hosts) | set(profile.login.hosts if profile.login else ())


def _pids_limit(config: Any) -> int | None:
    # resources.pids: null means the security profile's limit.
    pids: int | None = config.resources.pids
    return pids if pids is not None else PROFILES[config.security.profile].pids_limit


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
    problems = trust_problems(loaded, *_context(loaded, profile))
    reports = []
    for source in loaded.sources:
        if source.standing not in ("untrusted", "trusted") or not source.in_project:
            # --config and the user's own config are trusted by role; ./agent-sandbox.yaml of
            # another folder is not what `kapsis trust PROJECT` names.
            continue
        own = [problem for problem in problems if problem.origin.file == source.path]
        if source.standing == "untrusted":
            trust_store.trust(source.place, source.sha256, tuple(p.key for p in own))
        shown = tuple(str(problem) for problem in own)
        reports.append(TrustReport(source.path, source.sha256, shown, source.standing == "trusted"))
    return reports
