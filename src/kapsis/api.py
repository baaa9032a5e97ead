"""The Python API of Kapsis. The CLI is a thin layer over these functions.

>>> import kapsis
>>> result = kapsis.run(kapsis.RunRequest(project=Path("~/app"), task="make test"))
>>> print(result.exit_code, kapsis.status(result.agent_id))
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

from kapsis import paths
from kapsis.agents import find_profile
from kapsis.backends import Backend, get_backend
from kapsis.config.loader import LoadedConfig, load_config
from kapsis.errors import ConfigError
from kapsis.host.facts import probe_host
from kapsis.sandbox import launcher
from kapsis.sandbox.launcher import RunResult
from kapsis.sandbox.plan import RunRequest, SandboxPlan, build_plan
from kapsis.status import AgentStatus, StatusStore


def load_run_config(request: RunRequest) -> LoadedConfig:
    return load_config(request.project.expanduser(), request.config_file, request.flag_values())


def plan(request: RunRequest) -> SandboxPlan:
    """Compute the sandbox plan for a request without running anything."""
    loaded = load_run_config(request)
    profile = find_profile(loaded.config.agent.name)
    return build_plan(request, loaded, profile, probe_host())


def run(request: RunRequest, *, detach: bool = False, backend: Backend | None = None) -> RunResult:
    """Run an agent. In the foreground its output goes to stdout and this returns when it ends."""
    return launch(plan(request), detach=detach, backend=backend)


def launch(
    sandbox_plan: SandboxPlan, *, detach: bool = False, backend: Backend | None = None
) -> RunResult:
    """Run an already computed plan (see :func:`plan`)."""
    chosen = backend or get_backend()
    if StatusStore().read(sandbox_plan.agent_id) is not None:
        raise ConfigError(
            f"--agent-id {sandbox_plan.agent_id}: an agent with this id exists; pick another id "
            f"or remove it with `kapsis cleanup --agent {sandbox_plan.agent_id}`"
        )
    return launcher.launch(sandbox_plan, chosen, detach=detach)


def status(agent_id: str | None = None) -> list[AgentStatus]:
    """Status of one agent, or of all agents (oldest first)."""
    store = StatusStore()
    if agent_id is None:
        return store.all()
    record = store.read(agent_id)
    if record is None:
        raise ConfigError(f"AGENT_ID {agent_id}: no such agent; `kapsis status` lists them")
    return [record]


def logs(agent_id: str, *, follow: bool = False) -> Iterator[str]:
    """The agent's transcript (stdout and stderr), line by line."""
    record = status(agent_id)[0]
    backend = get_backend(record.backend)
    return backend.logs(agent_id, follow=follow and not record.finished)


def stop(agent_id: str) -> AgentStatus:
    """Stop a running agent; its run ends as 'killed' with error type 'stopped'."""
    record = status(agent_id)[0]
    if record.finished:
        return record
    store = StatusStore()
    store.update(agent_id, stop_requested=True, message="stopping")
    get_backend(record.backend).stop(agent_id)
    return store.read(agent_id) or record


@dataclass(frozen=True)
class CleanupItem:
    agent_id: str
    phase: str
    removes: tuple[str, ...]


def cleanup(
    agent_id: str | None = None, *, everything: bool = False, dry_run: bool = False
) -> list[CleanupItem]:
    """Remove agents' sandboxes, workspaces, transcripts and status (audit logs are kept).

    Without arguments only finished agents are removed; ``everything`` stops running ones too.
    """
    store = StatusStore()
    records = status(agent_id) if agent_id else store.all()
    known = {r.agent_id for r in records}
    orphans: list[str] = []
    if everything or agent_id is None:
        # Sandboxes left behind with no status record (e.g. a crash before the first write).
        sandboxes = paths.sandboxes_dir()
        if sandboxes.is_dir():
            orphans = [p.name for p in sandboxes.iterdir() if p.is_dir() and p.name not in known]
    items: list[CleanupItem] = []
    for record in records:
        if not record.finished and not (everything or agent_id):
            continue
        items.append(CleanupItem(record.agent_id, record.phase, _removable(record.agent_id, True)))
    items += [CleanupItem(orphan, "unknown", _removable(orphan, False)) for orphan in orphans]
    if dry_run:
        return items
    backend = get_backend()
    for item in items:
        current = store.read(item.agent_id)
        if current is not None and not current.finished:
            stop(item.agent_id)
            _wait_finished(store, item.agent_id)
        sandbox_plan = launcher.load_plan(item.agent_id)
        if sandbox_plan is not None:
            backend.remove(sandbox_plan)
        shutil.rmtree(paths.sandbox_dir(item.agent_id), ignore_errors=True)
        paths.transcript_path(item.agent_id).unlink(missing_ok=True)
        store.delete(item.agent_id)
    return items


def _wait_finished(store: StatusStore, agent_id: str, timeout: float = 15.0) -> None:
    """Give the agent's waiter time to write its final status before the record is removed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = store.read(agent_id)
        if current is None or current.finished:
            return
        time.sleep(0.2)


def _removable(agent_id: str, has_status: bool) -> tuple[str, ...]:
    found = [f"pod kapsis-{agent_id}"]
    for path in (paths.sandbox_dir(agent_id), paths.transcript_path(agent_id)):
        if path.exists():
            found.append(str(path))
    if has_status:
        found.append(str(StatusStore().path(agent_id)))
    return tuple(found)
