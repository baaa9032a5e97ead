"""The Python API of Kapsis. The CLI is a thin layer over these functions.

>>> import kapsis
>>> result = kapsis.run(kapsis.RunRequest(project=Path("~/app"), task="make test"))
>>> print(result.exit_code, kapsis.status(result.agent_id))
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kapsis import paths
from kapsis.agents.profiles import AgentProfile
from kapsis.backends import Backend, get_backend
from kapsis.config import trust_store
from kapsis.config.loader import LoadedConfig, load_config
from kapsis.config.trust import TrustProblem
from kapsis.config.trust_store import TrustedFile
from kapsis.errors import ConfigError, KapsisError
from kapsis.git.owner import remove_tree
from kapsis.host.facts import probe_host
from kapsis.sandbox import interrupted, launcher
from kapsis.sandbox.launcher import RunResult
from kapsis.sandbox.network_plan import NetworkPlan, plan_network
from kapsis.sandbox.plan import RunRequest, SandboxPlan, build_plan
from kapsis.sandbox.run_config import (
    TrustReport,
    load_trusted_config,
    needs_trust,
    trust_project,
)
from kapsis.sandbox.workspace_plan import UNSAVED_ERROR_TYPES
from kapsis.status import AgentStatus, StatusStore

if TYPE_CHECKING:
    from kapsis.audit import VerifyResult
    from kapsis.k8s.resource import AgentRequestStatus
    from kapsis.k8s.submission import Submission


def load_run_config(request: RunRequest) -> tuple[LoadedConfig, AgentProfile]:
    """The request's config and agent profile; refused (exit 2) where it needs trust."""
    return load_trusted_config(
        request.project.expanduser(), request.config_file, request.flag_values()
    )


def plan(request: RunRequest) -> SandboxPlan:
    """Compute the sandbox plan for a request without running anything."""
    check_backend(request)
    loaded, profile = load_run_config(request)
    return build_plan(request, loaded, profile, probe_host())


def network_policy(
    project: Path,
    *,
    agent: str | None = None,
    network_mode: str | None = None,
    allow: tuple[str, ...] = (),
    config_file: Path | None = None,
) -> NetworkPlan:
    """The network part of the plan a run on ``project`` would get (nothing is started)."""
    request = RunRequest(
        project=project,
        task="(policy)",
        agent=agent,
        network_mode=network_mode,
        allow=allow,
        config_file=config_file,
    )
    loaded, profile = load_run_config(request)
    return plan_network(loaded, profile, "policy", allow, probe_host().dns_servers)


BACKENDS = ("podman", "k8s")


def check_backend(request: RunRequest) -> None:
    if request.backend not in BACKENDS:
        raise ConfigError(f"--backend {request.backend}: unknown backend; use podman or k8s")
    if request.namespace is not None and request.backend != "k8s":
        raise ConfigError("--namespace: only a run with --backend k8s has a namespace")


def run(
    request: RunRequest,
    *,
    detach: bool = False,
    backend: Backend | None = None,
    on_status: Callable[[AgentRequestStatus], None] | None = None,
) -> RunResult:
    """Run an agent. In the foreground its output goes to stdout and this returns when it ends.

    With ``request.backend == "k8s"`` the agent runs on a cluster as an AgentRequest, whose
    status changes go to ``on_status`` while this follows it.
    """
    if request.backend == "k8s":  # both paths check the request's backend settings
        return k8s_run(k8s_submission(request), detach=detach, on_status=on_status)
    return launch(plan(request), detach=detach, backend=backend)


def k8s_submission(request: RunRequest) -> Submission:
    """What ``kapsis run --backend k8s`` would create, computed without any cluster."""
    check_backend(request)
    from kapsis.backends import kubernetes

    return kubernetes.submission_for(request)


def k8s_namespace(submission: Submission) -> str:
    """The namespace a submission goes to: its own, else the kubeconfig context's, else default."""
    from kapsis.backends import kubernetes

    return kubernetes.namespace_of(submission)


def k8s_run(
    submission: Submission,
    *,
    detach: bool = False,
    on_status: Callable[[AgentRequestStatus], None] | None = None,
    on_created: Callable[[Submission, str], None] | None = None,
) -> RunResult:
    """Create a computed submission on its cluster and, unless ``detach``, follow it to its end.

    Ctrl-C (KeyboardInterrupt) while following leaves the request running on the cluster.
    """
    from kapsis.backends import kubernetes

    return kubernetes.run(submission, detach=detach, on_status=on_status, on_created=on_created)


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
        records = store.all()
    else:
        record = store.read(agent_id)
        if record is None:
            raise ConfigError(f"AGENT_ID {agent_id}: no such agent; `kapsis status` lists them")
        records = [record]
    records = interrupted.settle(records, store)
    if any(r.backend == "k8s" and not r.finished for r in records):
        from kapsis.backends import kubernetes

        records = kubernetes.refresh(records)
    return records


def logs(agent_id: str, *, follow: bool = False) -> Iterator[str]:
    """The agent's transcript (stdout and stderr), line by line."""
    record = status(agent_id)[0]
    if record.backend == "k8s":
        from kapsis.backends import kubernetes

        return kubernetes.logs(record, follow=follow and not record.finished)
    backend = get_backend(record.backend)
    return backend.logs(agent_id, follow=follow and not record.finished)


def stop(agent_id: str) -> AgentStatus:
    """Stop a running agent; its run ends as 'killed' with error type 'stopped'."""
    record = status(agent_id)[0]
    if record.finished:
        return record
    if record.backend == "k8s":
        from kapsis.backends import kubernetes

        return kubernetes.stop(record)
    store = StatusStore()
    store.update(agent_id, stop_requested=True, message="stopping")
    get_backend(record.backend).stop(agent_id)
    return store.read(agent_id) or record


@dataclass(frozen=True)
class CleanupItem:
    agent_id: str
    phase: str
    removes: tuple[str, ...]
    kept: str | None = None  # why this agent was left alone
    problems: tuple[str, ...] = ()  # what could not be removed, and why


def cleanup(
    agent_id: str | None = None,
    *,
    everything: bool = False,
    dry_run: bool = False,
    branches: bool = False,
    force: bool = False,
) -> list[CleanupItem]:
    """Remove agents' sandboxes, worktrees, transcripts and status (audit logs are kept).

    Without arguments only finished agents are removed; ``everything`` stops running ones too.
    An agent whose work was never committed is kept unless ``force``. ``branches`` also deletes
    the agents' local branches once they are pushed (any branch, with ``force``).
    """
    from kapsis.workspace import cleanup as workspace_cleanup

    store = StatusStore()
    records = status(agent_id) if agent_id else status()
    known = {r.agent_id for r in records}
    on_cluster = [r for r in records if r.backend == "k8s"]
    records = [r for r in records if r.backend != "k8s"]
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
        try:
            sandbox_plan = launcher.load_plan(record.agent_id)
        except (ValueError, OSError):
            sandbox_plan = None  # unreadable: what can be removed without it still goes
        if not force and record.error_type in UNSAVED_ERROR_TYPES and record.commit_sha is None:
            reason = (
                f"its work was not committed ({record.error_type}) and is only in "
                f"{record.work_location}; --force removes it"
            )
            items.append(CleanupItem(record.agent_id, record.phase, (), kept=reason))
            continue
        removes = _removable(record.agent_id, True, sandbox_plan)
        if branches and sandbox_plan is not None:
            removes += workspace_cleanup.deletable_branch(sandbox_plan, force=force)
        items.append(CleanupItem(record.agent_id, record.phase, removes))
    for orphan in orphans:
        if not force and _may_hold_work(paths.sandbox_dir(orphan)):
            reason = (
                f"it has no status record, and its sandbox {paths.sandbox_dir(orphan)} may hold "
                "work no commit has; --force removes it"
            )
            items.append(CleanupItem(orphan, "unknown", (), kept=reason))
        else:
            items.append(CleanupItem(orphan, "unknown", _removable(orphan, False, None)))
    if on_cluster:
        items += _cleanup_k8s(on_cluster, everything or agent_id is not None, dry_run)
    stray_disks: list[CleanupItem] = []
    if everything:
        stray_disks = _stray_helper_disks(known | set(orphans), force=force)
    if dry_run:
        items += stray_disks
        if agent_id is None:
            items += _cleanup_bases(store, {i.agent_id for i in items if not i.kept}, dry_run)
        return items
    backend = get_backend()
    cluster_ids = {r.agent_id for r in on_cluster}
    done: list[CleanupItem] = []
    for item in items:
        if item.kept or item.agent_id in cluster_ids:
            done.append(item)
            continue
        problems = _remove_agent(store, backend, item, force=force)
        done.append(dataclasses.replace(item, problems=tuple(problems)))
    done += _release_stray_disks(stray_disks)
    if agent_id is None:
        done += _cleanup_bases(store, set(), dry_run)
    return done


def _stray_helper_disks(known: set[str], *, force: bool) -> list[CleanupItem]:
    """Rootless: disks the disk helper holds for agents this Kapsis home does not know (their
    sandbox went, say with ~/.kapsis). Another KAPSIS_HOME of the same user may own one, so
    they go only with ``force``."""
    from kapsis.workspace import disk, disk_helper

    items = []
    for stray in sorted(set(disk.helper_disks()) - known):
        where = f"disk {disk_helper.mount_point(os.geteuid(), stray)}"
        if force:
            items.append(CleanupItem(stray, "unknown", (where,)))
        else:
            reason = (
                f"its {where} belongs to no agent of this Kapsis home (another KAPSIS_HOME's?); "
                "--force removes it"
            )
            items.append(CleanupItem(stray, "unknown", (), kept=reason))
    return items


def _release_stray_disks(items: list[CleanupItem]) -> list[CleanupItem]:
    from kapsis.workspace import disk

    done = []
    for item in items:
        problems: tuple[str, ...] = ()
        if not item.kept:
            try:
                disk.helper("release", item.agent_id)
            except KapsisError as problem:
                problems = (f"disk: {problem}",)
        done.append(dataclasses.replace(item, problems=problems))
    return done


def _remove_agent(
    store: StatusStore, backend: Backend, item: CleanupItem, *, force: bool
) -> list[str]:
    """Remove what is left of one agent, each part on its own: a part that cannot go (its
    project, worktree or remote deleted, a busy mount) is said and the rest still goes. The
    status record goes last, and only when nothing is left, so a later cleanup finds the rest."""
    from kapsis.workspace import cleanup as workspace_cleanup
    from kapsis.workspace.disk import release_disk

    problems: list[str] = []

    def attempt(what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as problem:  # said, and the other parts still go
            problems.append(f"{what}: {type(problem).__name__}: {problem}")

    current = store.read(item.agent_id)
    if current is not None and not current.finished:
        attempt("stopping the agent", lambda: stop(item.agent_id))
        _wait_finished(store, item.agent_id)
    sandbox_plan: SandboxPlan | None = None
    try:
        sandbox_plan = launcher.load_plan(item.agent_id)
    except ValueError as problem:
        problems.append(f"its plan is unreadable ({problem}); its pod and worktree stay")
    if sandbox_plan is not None:
        plan = sandbox_plan
        attempt(f"pod {plan.pod_name}", lambda: backend.remove(plan))
        attempt("workspace disk", lambda: release_disk(plan.workspace))
        attempt("worktree", lambda: workspace_cleanup.remove_worktree_of(plan))
        if plan.workspace.worktree and Path(plan.workspace.worktree).exists():
            problems.append(f"worktree {plan.workspace.worktree} is still there")
        if any(entry.startswith("branch ") for entry in item.removes):
            attempt("branch", lambda: workspace_cleanup.delete_branch(plan, force=force))
    sandbox = paths.sandbox_dir(item.agent_id)
    attempt(str(sandbox), lambda: remove_tree(sandbox, None))
    transcript = paths.transcript_path(item.agent_id)
    attempt(str(transcript), lambda: transcript.unlink(missing_ok=True))
    if sandbox.exists():
        problems.append(f"{sandbox} is still there (a mount inside it may be busy)")
    if not problems:
        store.delete(item.agent_id)
    return problems


def _cleanup_bases(store: StatusStore, leaving: set[str], dry_run: bool) -> list[CleanupItem]:
    """The projects' frozen bases that no running agent uses go (disk said for each).

    Decided with each project's base lock held: a launch saves its plan, which names its base,
    before it takes that lock to make or keep the base, so cleanup either removes the base
    first (and the launch makes it again) or sees the launch using it.
    """
    from kapsis.workspace import bases

    items: list[CleanupItem] = []
    for key in sorted({record.key for record in bases.records()}):
        with bases.project_lock(key):
            in_use: dict[str, str] = {}
            for record in store.all():
                if record.finished or record.agent_id in leaving:
                    continue
                plan = launcher.load_plan(record.agent_id)
                if plan is not None and plan.workspace.base is not None:
                    in_use.setdefault(plan.workspace.base, record.agent_id)
            for base in bases.records(key):
                size = f"base {base.commit[:12]}"
                phase = f"{base.bytes / 1e6:.1f} MB, {base.files} files"
                user = in_use.get(base.tree)
                if user is not None:
                    items.append(CleanupItem(size, phase, (), kept=f"in use by agent {user}"))
                    continue
                items.append(CleanupItem(size, phase, (base.tree,)))
                if not dry_run:
                    bases.remove_base(base)
            if not dry_run:
                bases.remove_stale_scratch(key)
    return items


def _cleanup_k8s(records: list[AgentStatus], running_too: bool, dry_run: bool) -> list[CleanupItem]:
    """Delete the AgentRequests of finished k8s runs (running ones too with --all / --agent)."""
    from kapsis.backends import kubernetes

    items: list[CleanupItem] = []
    for record in records:
        if not record.finished and not running_too:
            continue
        items.append(CleanupItem(record.agent_id, record.phase, kubernetes.removes(record)))
        if not dry_run:
            kubernetes.remove(record)
    return items


def _wait_finished(store: StatusStore, agent_id: str, timeout: float = 15.0) -> None:
    """Give the agent's waiter time to write its final status before the record is removed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = store.read(agent_id)
        if current is None or current.finished:
            return
        time.sleep(0.2)


def _may_hold_work(sandbox: Path) -> bool:
    """Whether a sandbox dir has an agent's writes in it (an upper dir with entries, or a disk)."""
    from kapsis.sandbox.workspace_plan import DISK_IMAGE, DISK_LAYER

    if (sandbox / DISK_IMAGE).exists() or (sandbox / DISK_LAYER).exists():
        return True
    try:
        with os.scandir(sandbox / "upper") as entries:
            return any(entry.name != ".git" for entry in entries)
    except OSError:
        return False


def _removable(agent_id: str, has_status: bool, plan: SandboxPlan | None) -> tuple[str, ...]:
    found = [f"pod kapsis-{agent_id}"]
    candidates = [paths.sandbox_dir(agent_id), paths.transcript_path(agent_id)]
    if plan is not None and plan.workspace.worktree:
        candidates.append(Path(plan.workspace.worktree))
    for path in candidates:
        if path.exists():
            found.append(str(path))
    if has_status:
        found.append(str(StatusStore().path(agent_id)))
    return tuple(found)


def audit_files(target: str) -> tuple[list[Path], str | None]:
    """The files of an audit chain given an agent id or a file; and the agent id if known."""
    from kapsis.audit import audit_path, rotated_files

    candidate = Path(target)
    if candidate.suffix == ".jsonl" and candidate.exists():
        return rotated_files(candidate), None
    files = rotated_files(audit_path(target))
    if not files:
        raise ConfigError(
            f"AGENT_ID {target}: no audit log in {paths.audit_dir()}; pass an agent id or a file"
        )
    return files, target


def audit_verify(target: str, key_file: Path | None = None) -> VerifyResult:
    """Verify an agent's audit chain (all its rotated files) with the host key or ``key_file``."""
    from kapsis.audit import verify
    from kapsis.audit.keys import load_public_key, signing_key

    files, agent_id = audit_files(target)
    key = load_public_key(key_file) if key_file else signing_key().public_key()
    record = StatusStore().read(agent_id) if agent_id else None
    # A session still running has no session_end yet; one that finished must have it.
    finished = record.finished if record is not None else True
    return verify(files, key, finished=finished)


def audit_events(agent_id: str, event_type: str | None = None) -> Iterator[dict[str, Any]]:
    """The records of an agent's audit chain, oldest first (optionally of one type), read one
    line at a time: a chain of any length costs the memory of one record. A line that is not
    JSON comes as ``{"seq": None, "event_type": "unreadable", ...}`` (``audit verify`` says
    what is wrong with it)."""
    files, _ = audit_files(agent_id)
    for file in files:
        with file.open("rb") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = {"seq": None, "event_type": "unreadable", "detail": {}}
                if not isinstance(record, dict):
                    record = {"seq": None, "event_type": "unreadable", "detail": {}}
                if event_type is None or record.get("event_type") == event_type:
                    yield record


def audit_public_key() -> str:
    """The host's audit public key (PEM), created with the key pair on first use."""
    from kapsis.audit.keys import public_pem, signing_key

    return public_pem(signing_key().public_key())


def audit_alerts(agent_id: str) -> list[dict[str, Any]]:
    """The alerts raised on an agent's audit stream, oldest first."""
    from kapsis.audit.alerts import alerts_path, read_alerts

    files, _ = audit_files(agent_id)
    return read_alerts(alerts_path(files[-1]))


def config_with_trust(
    project: Path | None, config_file: Path | None = None
) -> tuple[LoadedConfig, list[TrustProblem]]:
    """The effective config of ``project`` and what of it needs trust (nothing is refused)."""
    loaded = load_config(project, config_file)
    return loaded, needs_trust(loaded)


def trust(project: Path) -> list[TrustReport]:
    """Trust the project's own config files as they are now (``kapsis trust PROJECT``)."""
    return trust_project(project.expanduser())


def trusted_files() -> list[TrustedFile]:
    """Every project config file the user trusted, with its recorded content hash."""
    return sorted(trust_store.trusted_files().values(), key=lambda record: record.path)


def revoke_trust(target: Path) -> list[TrustedFile]:
    """Forget the trust of a file, or of every file under a project folder."""
    return trust_store.revoke([trust_store.revoke_target(target.expanduser())])
