"""Run a plan through a backend, keeping the host-side status and audit records up to date.

Phases: initializing -> preparing -> starting -> running -> post_processing -> complete|failed.
The same :func:`finish` closes a run whether ``kapsis run`` waited in the foreground or a
detached supervisor (``python -m kapsis.sandbox.supervise``) did.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kapsis import paths
from kapsis.audit import AuditLog
from kapsis.audit.agent_reports import AUDIT_SOCKET, TRACE_FIFO, AgentReportServer
from kapsis.audit.alerts import Alert, AlertEngine
from kapsis.backends import Backend, ExitInfo
from kapsis.errors import (
    AgentFailedError,
    AgentKilledError,
    AgentTimeoutError,
    ExitCode,
    GatewayStoppedError,
    GitWorkflowError,
    ImageError,
    KapsisError,
    SandboxStartError,
)
from kapsis.sandbox.agent_outcome import reported_activity, reported_failure
from kapsis.sandbox.api_watch import ApiWatcher
from kapsis.sandbox.idle import STALLED, IdleWatcher, stalled_message
from kapsis.sandbox.plan import SandboxPlan
from kapsis.sandbox.save_work import WorkOutcome, save_work, work_location
from kapsis.secrets.redact import Redactor
from kapsis.status import AgentStatus, StatusStore, liveness
from kapsis.status.activity import ActivityRecorder
from kapsis.status.store import utc_now

if TYPE_CHECKING:
    from kapsis.secrets.delivery import SecretWriter

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class RunResult:
    """The outcome of a run, as the CLI reports it."""

    agent_id: str
    exit_code: int
    agent_exit_code: int | None
    error_type: str | None
    message: str
    detached: bool = False
    branch: str | None = None
    commit_sha: str | None = None
    push_status: str = "not_requested"
    pr_url: str | None = None
    excluded_paths: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    carried_commit: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == ExitCode.SUCCESS


def save_plan(plan: SandboxPlan) -> Path:
    path = paths.private_dir(Path(plan.workspace.root)) / PLAN_FILE
    paths.write_private(path, plan.model_dump_json(indent=2))
    return path


def load_plan(agent_id: str) -> SandboxPlan | None:
    path = paths.sandbox_dir(agent_id) / PLAN_FILE
    if not path.exists():
        return None
    return SandboxPlan.model_validate_json(path.read_text(encoding="utf-8"))


def initial_status(plan: SandboxPlan, backend: Backend) -> AgentStatus:
    now = utc_now()
    return AgentStatus(
        agent_id=plan.agent_id,
        project=plan.project,
        branch=plan.git.branch,
        backend=backend.name,
        agent=plan.agent,
        phase="initializing",
        message="planning the sandbox",
        started_at=now,
        updated_at=now,
        limits_enforced=plan.resources.limits_enforced,
        disk=plan.resources.disk,
        disk_enforced=plan.resources.disk_enforced,
        network_mode=plan.network.mode,
        security_profile=plan.security.profile,
        task=plan.task_summary,
        workspace_mode=plan.workspace.mode,
        base=plan.git.base,
        start_commit=plan.git.start_commit,
        carried_commit=plan.git.carried_commit,
        work_location=plan.workspace.worktree or plan.workspace.upper,
        supervisor=liveness.identify(os.getpid()),
    )


def launch(plan: SandboxPlan, backend: Backend, *, detach: bool) -> RunResult:
    """Start the sandbox; in the foreground also wait and finish."""
    paths.make_private(paths.kapsis_home())
    store = StatusStore()
    audit = AuditLog(plan.agent_id, enabled=plan.audit_enabled)
    store.write(initial_status(plan, backend))
    audit.record(
        "session_start",
        project=plan.project,
        agent=plan.agent,
        image=plan.image,
        network_mode=plan.network.mode,
        security_profile=plan.security.profile,
        memory=plan.resources.memory,
        cpus=plan.resources.cpus,
        pids_limit=plan.resources.pids_limit,
        limits_enforced=plan.resources.limits_enforced,
        disk=plan.resources.disk,
        disk_enforced=plan.resources.disk_enforced,
        # Secrets by name only: their values never reach the audit trail.
        secrets_passed=[secret.name for secret in plan.secrets],
    )
    save_plan(plan)
    reports: AgentReportServer | None = None
    try:
        values = _resolve_secrets(plan)
    except KapsisError as error:
        return _close(plan, store, audit, error.exit_code, None, error.error_type, str(error))
    redactor = Redactor(values.values())
    audit.redactor = redactor
    try:
        store.update(plan.agent_id, phase="preparing", message="checking the image")
        backend.preflight(plan)
        store.update(plan.agent_id, phase="preparing", message="preparing the workspace")
        if plan.git.repository or plan.workspace.needs_delta:
            # Loaded only for a repository, or a project with files to hide: the git machinery
            # is not free to import.
            from kapsis.workspace.prepare import prepare_workspace

            made = prepare_workspace(plan)
            if made is not None:
                # The first launch on a project (or after a large change) pays for a checkout.
                audit.record(
                    "base_made",
                    commit=made.commit,
                    files=made.files,
                    bytes=made.bytes,
                    seconds=made.seconds,
                )
                store.update(
                    plan.agent_id,
                    phase="preparing",
                    message=f"made the project's frozen base: {made.files} files, "
                    f"{made.bytes / 1e6:.1f} MB in {made.seconds:.1f} s",
                )
        if plan.git.branch:
            audit.record(
                "branch_ready",
                branch=plan.git.branch,
                start_commit=plan.git.start_commit,
                resume=plan.git.resume,
                mode=plan.workspace.mode,
                carried_commit=plan.git.carried_commit,
                carried_paths=plan.git.carried_paths,
                left_out_paths=plan.git.left_out_paths,
                base_commit=plan.workspace.base_commit,
                delta_paths=plan.workspace.delta_paths,
                shared_live=[shared.path for shared in plan.workspace.shared],
            )
        store.update(plan.agent_id, phase="starting", message="starting the sandbox")
        # Listening before the sandbox exists: its socket is mounted into the sandbox.
        reports = open_agent_reports(plan, audit, redactor)
        sandbox = backend.launch(plan, attach=not detach, redactor=redactor)
        delivery = _deliver_secrets(plan, values)
    except KapsisError as error:
        if reports is not None:
            reports.stop()
        backend.remove(plan)
        _abandon_workspace(plan)
        message = redactor.text(str(error))
        return _close(plan, store, audit, error.exit_code, None, error.error_type, message)
    store.update(plan.agent_id, phase="running", message=f"agent {plan.agent} is running")
    audit.record("sandbox_started", pod=plan.pod_name)
    if detach:
        # The agent waits for its secrets before it starts: hand them over before returning.
        _record_delivery(plan, audit, delivery)
        # The supervisor takes over the listening socket, the transcript pipe and the values it
        # must redact, and carries on from here.
        _spawn_supervisor(
            plan.agent_id,
            reports,
            sandbox.handover(),
            values,
            # Named before anything is handed over or this process returns: a reader must
            # never see a run whose named supervisor has exited while the real one lives.
            on_started=lambda pid: store.update(plan.agent_id, supervisor=liveness.identify(pid)),
        )
        if reports is not None:
            reports.listener.close()
        for fd in sandbox.handover():
            os.close(fd)
        return RunResult(plan.agent_id, ExitCode.SUCCESS, None, None, "started", detached=True)
    if reports is not None:
        reports.start()
    idle = IdleWatcher.start_for(plan, audit, lambda: backend.stop(plan.agent_id, grace_seconds=2))
    api_watch = ApiWatcher.start_for(plan, audit)
    try:
        exit_info = sandbox.wait()
    except KeyboardInterrupt:
        backend.stop(plan.agent_id, grace_seconds=2)
        backend.remove(plan)
        return _close(plan, store, audit, ExitCode.INTERRUPTED, None, "interrupted", "interrupted")
    except KapsisError as error:
        backend.remove(plan)
        if isinstance(error, (SandboxStartError, ImageError)):
            # podman refused the container (it only says so when waited for): the agent never
            # ran, so its branch holds nothing and goes, as when the launch itself fails.
            _abandon_workspace(plan)
        message = redactor.text(str(error))
        return _close(plan, store, audit, error.exit_code, None, error.error_type, message)
    finally:
        if idle is not None:
            idle.finish()
        if api_watch is not None:
            api_watch.finish()
        if reports is not None:
            reports.stop()
        if delivery is not None:
            delivery.stop()
    _record_delivery(plan, audit, delivery)
    return finish(plan, backend, exit_info, redactor)


def _abandon_workspace(plan: SandboxPlan) -> None:
    if plan.git.repository:
        from kapsis.workspace.prepare import abandon_workspace

        abandon_workspace(plan)


def _resolve_secrets(plan: SandboxPlan) -> dict[str, str]:
    if not plan.secrets:
        return {}
    from kapsis.secrets.resolve import resolve_secrets

    return resolve_secrets(plan.secrets)


def _deliver_secrets(plan: SandboxPlan, values: dict[str, str]) -> SecretWriter | None:
    """Start handing the values to the sandbox (it reads them before the agent starts)."""
    if not plan.secrets:
        return None
    from kapsis.secrets.delivery import SecretWriter

    return SecretWriter(Path(plan.workspace.root), plan.secrets, values).start()


def _record_delivery(plan: SandboxPlan, audit: AuditLog, delivery: SecretWriter | None) -> None:
    """Wait for the hand-over to end; record, by name only, what the sandbox received."""
    if delivery is None:
        return
    from kapsis.secrets.delivery import DELIVERY_TIMEOUT

    delivery.join(DELIVERY_TIMEOUT)
    for secret in plan.secrets:
        audit.record(
            "secret_injected" if secret.name in delivery.delivered else "secret_not_injected",
            name=secret.name,
            secret_source=secret.source,
            into=secret.target_file or "environment",
        )


def open_agent_reports(
    plan: SandboxPlan,
    audit: AuditLog,
    redactor: Redactor,
    listener: socket.socket | None = None,
) -> AgentReportServer | None:
    """The host end of the sandbox's audit socket (bound, not yet serving), if auditing is on."""
    if not plan.audit_enabled:
        return None
    from kapsis.network.policy import load_category

    root = paths.private_dir(Path(plan.workspace.root))

    def registries() -> frozenset[str]:
        return frozenset(load_category("package-registries").hosts)

    store = StatusStore()

    def on_alert(raised: list[Alert]) -> None:
        current = store.read(plan.agent_id)
        if current is not None:
            shown = [f"{a.severity}: {a.rule} (seq {a.seq})" for a in raised]
            store.update(plan.agent_id, alerts=[*current.alerts, *shown])

    activity = ActivityRecorder(store, plan.agent_id)
    return AgentReportServer(
        audit,
        root / AUDIT_SOCKET,
        redactor,
        listener,
        alerts=AlertEngine(registries),
        on_alert=on_alert,
        on_record=activity.observe,
        on_stop=activity.flush,
        trace=root / TRACE_FIFO,
    )


def finish(
    plan: SandboxPlan, backend: Backend, exit_info: ExitInfo, redactor: Redactor
) -> RunResult:
    """Classify how the agent ended, save its work, tear the sandbox down, write the status.

    ``redactor`` hides the run's secret values in the messages and notes that are kept."""
    store = StatusStore()
    # A full disk must not keep the run from its final status: what cannot be recorded is said.
    audit = AuditLog(plan.agent_id, enabled=plan.audit_enabled, redactor=redactor, keep_going=True)
    store.update(plan.agent_id, phase="post_processing", message="saving the agent's work")
    audit.record("sandbox_exited", exit_code=exit_info.exit_code, oom_killed=exit_info.oom_killed)
    current = store.read(plan.agent_id)
    error = classify(
        plan,
        exit_info,
        stop_requested=bool(current and current.stop_requested),
        stalled=bool(current and current.stalled),
    )
    if error is None or isinstance(error, AgentFailedError):
        # A CLI whose exit code can lie says in its output why it failed.
        transcript = paths.transcript_path(plan.agent_id)
        error = (
            reported_failure(plan.agent, transcript, plan.agent_failure, exit_info.exit_code)
            or error
        )
    try:
        _record_activity(plan, audit)
    except Exception as problem:  # what the agent printed must not keep the run from its end
        audit.record("agent_activity_unread", source="host", problem=type(problem).__name__)
    # Each stage below runs whatever became of the one before: the run always ends with its
    # final status, the audit's session_end and seal, and the sandbox removed.
    try:
        work = save_work(plan, agent_succeeded=error is None)
    except Exception as problem:  # a bug or a hostile tree: said, never lost
        work = WorkOutcome(branch=plan.git.branch, work_location=work_location(plan))
        work.error = GitWorkflowError(
            f"saving the agent's work failed ({type(problem).__name__}: {problem}); "
            f"it is kept in {work.work_location}"
        )
    _audit_work(audit, work)
    if exit_info.transcript_dropped:
        work.notes.append(
            f"the transcript was cut at its size cap; {exit_info.transcript_dropped} bytes of "
            "the agent's output after it were dropped"
        )
        audit.record("transcript_cut", dropped_bytes=exit_info.transcript_dropped)
    store.update(plan.agent_id, **redactor.value(work.status_fields()))
    gateway_stopped = False
    if plan.network.gateway is not None:
        try:
            # Only filtered runs read the gateway's logs: its parsers load here, not at start-up.
            from kapsis.sandbox.network_record import record_network

            notes, gateway_ran = record_network(plan, backend, store, audit, redactor)
            work.notes += notes
            gateway_stopped = not gateway_ran
        except Exception as problem:
            # The record of what the gateway saw must not keep the sandbox from being removed.
            work.notes.append(f"could not read the gateway's records: {problem}")
    try:
        backend.remove(plan)
        _release_saved_layer(plan, work)
    except Exception as problem:
        work.notes.append(
            f"could not remove the sandbox ({problem}); `kapsis cleanup --agent "
            f"{plan.agent_id}` tries again"
        )
    work.notes = [redactor.text(note) for note in work.notes]
    if error is None and work.error is not None:
        error = work.error
    if error is None and gateway_stopped:
        error = GatewayStoppedError(
            "the network gateway stopped during the run: from then on the agent had no network "
            "(cut off, never opened); what it did is saved, but the run fails because it may "
            "have gone wrong for that"
        )
    if error is None:
        return _close(plan, store, audit, ExitCode.SUCCESS, 0, None, _success_message(work), work)
    code, agent_code = error.exit_code, exit_info.exit_code
    message = redactor.text(str(error))
    return _close(plan, store, audit, code, agent_code, error.error_type, message, work)


def _record_activity(plan: SandboxPlan, audit: AuditLog) -> None:
    """The actions a CLI without hooks printed (its profile's ``activity``), as its reports."""
    found, cut = reported_activity(paths.transcript_path(plan.agent_id), plan.agent_activity)
    for tool, line in found:
        audit.record("tool_use", source="agent", hook="output", tool=tool, reported={"line": line})
    if cut:
        audit.record("agent_activity_cut", source="host", recorded=len(found))


def _release_saved_layer(plan: SandboxPlan, work: WorkOutcome) -> None:
    """An overlay layer whose work is all committed is not needed any more: its disk goes now.
    A worktree (the user's checkout of the branch), unsaved work and a layer that holds files
    no commit has (excluded, ignored, too large) stay until cleanup."""
    workspace = plan.workspace
    if workspace.disk_image is None or workspace.mode != "overlay" or not plan.git.commits:
        return
    if work.error is None and not work.left_out:
        from kapsis.workspace.disk import release_disk

        release_disk(workspace)


def _success_message(work: WorkOutcome) -> str:
    if work.push_status in ("pushed", "up_to_date") and work.commit_sha:
        return f"agent finished; {work.commit_sha[:12]} is on {work.branch} and pushed"
    if work.commit_sha:
        return f"agent finished; its work is commit {work.commit_sha[:12]} on {work.branch}"
    return "agent finished successfully"


def _audit_work(audit: AuditLog, work: WorkOutcome) -> None:
    if work.commit_sha or work.excluded_paths:
        audit.record(
            "git_commit",
            branch=work.branch,
            commit=work.commit_sha,
            host_commit=work.created_commit,
            agent_commits=work.agent_commits,
            excluded=work.excluded_paths,
        )
    if work.push_status != "not_requested":
        audit.record(
            "git_push", branch=work.branch, status=work.push_status, message=work.push_message
        )
    if work.pr_url:
        audit.record("post_push_hook", pr_url=work.pr_url)
    if work.error is not None:
        audit.record("git_error", error_type=work.error.error_type, message=str(work.error))


def classify(
    plan: SandboxPlan, exit_info: ExitInfo, *, stop_requested: bool, stalled: bool = False
) -> KapsisError | None:
    """Map the agent's exit to None (success) or the error that explains it."""
    if stop_requested and stalled and plan.resources.idle_timeout_seconds is not None:
        message = stalled_message(plan.resources.idle_timeout_seconds)
        return AgentKilledError(f"the agent was stopped: {message}", STALLED)
    if stop_requested:
        return AgentKilledError("the agent was stopped by `kapsis stop`", "stopped")
    if exit_info.oom_killed:
        return AgentKilledError(
            f"the agent ran out of memory (limit {plan.resources.memory}) and was killed", "oom"
        )
    if exit_info.timed_out:
        return AgentTimeoutError(
            f"the agent ran past its time limit ({plan.resources.timeout_seconds}s) and was killed"
        )
    if exit_info.exit_code == 0:
        return None
    if exit_info.exit_code > 128:
        signal_number = exit_info.exit_code - 128
        return AgentKilledError(f"the agent was killed by signal {signal_number}", "killed")
    return AgentFailedError(
        f"the agent exited with code {exit_info.exit_code}", agent_exit_code=exit_info.exit_code
    )


def _close(
    plan: SandboxPlan,
    store: StatusStore,
    audit: AuditLog,
    exit_code: int,
    agent_exit_code: int | None,
    error_type: str | None,
    message: str,
    work: WorkOutcome | None = None,
) -> RunResult:
    phase = "complete" if exit_code == ExitCode.SUCCESS else "failed"
    audit.record(
        "session_end", phase=phase, exit_code=int(exit_code), error_type=error_type, message=message
    )
    notes = work.notes if work is not None else []
    if audit.failures:
        notes.append(
            f"{audit.failures} audit record(s) could not be written ({audit.failure}); the "
            "audit trail is incomplete"
        )
    store.update(
        plan.agent_id,
        phase=phase,
        message=message,
        notes=notes,
        exit_code=int(exit_code),
        agent_exit_code=agent_exit_code,
        error_type=error_type,
    )
    if work is None:
        return RunResult(plan.agent_id, int(exit_code), agent_exit_code, error_type, message)
    return RunResult(
        plan.agent_id,
        int(exit_code),
        agent_exit_code,
        error_type,
        message,
        branch=work.branch,
        commit_sha=work.commit_sha,
        push_status=work.push_status,
        pr_url=work.pr_url,
        excluded_paths=work.excluded_paths,
        notes=work.notes,
        carried_commit=plan.git.carried_commit,
    )


def _spawn_supervisor(
    agent_id: str,
    reports: AgentReportServer | None,
    sandbox_fds: tuple[int, ...],
    values: dict[str, str],
    on_started: Callable[[int], object],
) -> None:
    """Start the detached supervisor (``on_started`` gets its pid first); what it takes over
    comes through its stdin (a pipe, so the secret values it needs for redaction are never
    written anywhere)."""
    log = paths.sandbox_dir(agent_id) / "supervisor.log"
    audit_fd = reports.listener.fileno() if reports is not None else None
    handover = {
        "audit_fd": audit_fd,
        "sandbox_fds": list(sandbox_fds),
        "secrets": list(values.values()),
    }
    passed = (*sandbox_fds, *([audit_fd] if audit_fd is not None else []))
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    with os.fdopen(descriptor, "ab") as output:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "kapsis.sandbox.supervise", agent_id],
            stdin=subprocess.PIPE,
            stdout=output,
            stderr=output,
            start_new_session=True,
            pass_fds=passed,
        )
    on_started(supervisor.pid)
    assert supervisor.stdin is not None
    supervisor.stdin.write(json.dumps(handover).encode())
    supervisor.stdin.close()
