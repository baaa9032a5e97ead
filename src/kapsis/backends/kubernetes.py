"""The Kubernetes backend of the CLI: an ``AgentRequest`` per run, followed until it ends.

``kapsis run --backend k8s`` creates the request (and its task ConfigMap) from the same flags and
config as a local run (:mod:`kapsis.k8s.submission`), records it in the local status store
(backend ``k8s``, namespace, context), follows its status with a watch and returns the same
:class:`~kapsis.sandbox.launcher.RunResult` and exit codes as a local run. The operator does the
work; status, logs, stop and cleanup read and act on the request through the API. The
``kubernetes`` package is only imported when a cluster is actually used.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from kapsis.errors import AgentKilledError, ConfigError, ExitCode, KapsisError
from kapsis.k8s import names, status_view
from kapsis.k8s.resource import FINAL_PHASES, AgentRequestStatus
from kapsis.k8s.submission import Submission, build_submission, read_git_facts
from kapsis.sandbox.launcher import RunResult
from kapsis.sandbox.plan import RunRequest, new_agent_id
from kapsis.sandbox.run_config import load_trusted_config
from kapsis.status import AgentStatus, StatusStore

if TYPE_CHECKING:
    from kapsis.backends.k8s_client import Cluster

StatusCallback = Callable[[AgentRequestStatus], None]
STOP_WAIT_SECONDS = 10.0


def submission_for(request: RunRequest) -> Submission:
    """The AgentRequest a run request means (reads the config and the git repository)."""
    project = request.project.expanduser()
    if not project.is_dir():
        raise ConfigError(f"PROJECT {request.project}: no such directory; pass a project folder")
    loaded, profile = load_trusted_config(project, request.config_file, request.flag_values())
    git = loaded.config.git
    facts = read_git_facts(project.resolve(), git.remote, str(loaded.origin_of(("git", "remote"))))
    return build_submission(request, loaded, profile, facts, request.agent_id or new_agent_id())


def namespace_of(submission: Submission) -> str:
    """--namespace / kubernetes.namespace, else the kubeconfig context's, else ``default``."""
    if submission.namespace:
        return submission.namespace
    from kapsis.backends.k8s_client import context_namespace

    return context_namespace(submission.context) or "default"


def connect(context: str | None) -> Cluster:
    from kapsis.backends.k8s_client import connect as connect_cluster

    return connect_cluster(context)


def submit(submission: Submission, namespace: str, cluster: Cluster) -> dict[str, Any]:
    """Create the task ConfigMap (if any) and the request; returns the created request."""
    from kapsis.backends.k8s_client import ClusterRefusedError

    cluster.preflight(namespace)
    if cluster.get_request(namespace, submission.name) is not None:
        raise ConfigError(
            f"--agent-id {submission.agent_id}: an AgentRequest of this name exists in "
            f"{namespace}; pick another id or remove it with "
            f"`kapsis cleanup --agent {submission.agent_id}`"
        )
    config_map = submission.config_map(namespace)
    if config_map is not None:
        try:
            cluster.create(config_map)
        except ClusterRefusedError as error:
            if error.status != 409:
                raise
            raise ConfigError(
                f"ConfigMap {namespace}/{submission.task_config_map} exists; pick another "
                "--agent-id"
            ) from None
    try:
        created = cluster.create(submission.agent_request(namespace))
    except KapsisError:
        if config_map is not None:
            cluster.delete_config_map(namespace, submission.task_config_map)
        raise
    if config_map is not None:
        cluster.own_config_map(namespace, submission.task_config_map, created)
    return created


def run(
    submission: Submission,
    *,
    detach: bool = False,
    on_status: StatusCallback | None = None,
    on_created: Callable[[Submission, str], None] | None = None,
) -> RunResult:
    """Create the request; unless ``detach``, follow it until it is Complete or Failed.

    ``on_created(submission, namespace)`` runs once the request exists on the cluster.
    """
    store = StatusStore()
    if store.read(submission.agent_id) is not None:
        raise ConfigError(
            f"--agent-id {submission.agent_id}: an agent with this id exists; pick another id "
            f"or remove it with `kapsis cleanup --agent {submission.agent_id}`"
        )
    namespace = namespace_of(submission)
    cluster = connect(submission.context)
    created = submit(submission, namespace, cluster)
    if on_created is not None:
        on_created(submission, namespace)
    store.write(
        status_view.initial_record(submission, namespace, submission.context, submission.project)
    )
    if detach:
        return status_view.run_result(
            submission.agent_id, status_view.parse_status(created), detached=True
        )
    final = follow(cluster, namespace, submission.name, created, on_status)  # records it too
    return status_view.run_result(submission.agent_id, final, detached=False)


def follow(
    cluster: Cluster,
    namespace: str,
    name: str,
    current: dict[str, Any],
    on_status: StatusCallback | None = None,
) -> AgentRequestStatus:
    """Watch the request until it is Complete or Failed, reporting each change of its status.

    Between watches (each lasts at most ``WATCH_SECONDS``) the request is read again, so a lost
    event or an expired resourceVersion costs one read, never a stuck run.
    """
    store = StatusStore()
    shown: tuple[str, int, str] | None = None
    obj: dict[str, Any] | None = current
    while True:
        if obj is None:
            raise AgentKilledError(
                f"AgentRequest {namespace}/{name} was deleted while it ran", "deleted"
            )
        status = status_view.parse_status(obj)
        seen = (status.phase, status.progress, status.message)
        if seen != shown:
            shown = seen
            if on_status is not None:
                on_status(status)
            if store.read(name) is not None:
                store.update(name, **status_view.record_changes(status))
        if status.phase in FINAL_PHASES:
            return status
        version = str(obj.get("metadata", {}).get("resourceVersion") or "")
        for changed in cluster.watch_request(namespace, name, version):
            obj = changed
            if changed is None:
                break
            status = status_view.parse_status(changed)
            if (status.phase, status.progress, status.message) != shown:
                break
        else:
            obj = cluster.get_request(namespace, name)


def refresh(records: Iterable[AgentStatus]) -> list[AgentStatus]:
    """The records with their k8s entries read again from the cluster where it can be reached.

    A record whose cluster cannot be reached is returned with its message prefixed
    ``cluster unreachable:`` (the stored record is left alone).
    """
    from kapsis.backends.k8s_client import ClusterUnreachableError

    store = StatusStore()
    clusters: dict[str | None, Cluster | KapsisError] = {}
    result: list[AgentStatus] = []
    for record in records:
        if record.backend != status_view.BACKEND_NAME or record.finished:
            result.append(record)
            continue
        context = record.kube_context
        if context not in clusters:
            try:
                clusters[context] = connect(context)
            except KapsisError as error:
                clusters[context] = error
        cluster = clusters[context]
        try:
            if isinstance(cluster, KapsisError):
                raise cluster
            obj = cluster.get_request(record.namespace or "default", record.agent_id)
        except (ClusterUnreachableError, ConfigError) as error:
            clusters[context] = error
            note = "cluster unreachable" if isinstance(error, ClusterUnreachableError) else error
            result.append(record.model_copy(update={"message": f"{note}: {record.message}"}))
            continue
        if obj is None:
            result.append(
                store.update(
                    record.agent_id,
                    phase="failed",
                    progress=100,
                    exit_code=int(ExitCode.KILLED),
                    error_type="deleted",
                    message="the AgentRequest was deleted on the cluster",
                )
            )
            continue
        changes = status_view.record_changes(status_view.parse_status(obj))
        result.append(store.update(record.agent_id, **changes))
    return result


def _pod_name(cluster: Cluster, record: AgentStatus, *, wait: bool) -> str:
    namespace = record.namespace or "default"
    while True:
        obj = cluster.get_request(namespace, record.agent_id)
        if obj is None:
            raise ConfigError(
                f"AGENT_ID {record.agent_id}: its AgentRequest {namespace}/{record.agent_id} no "
                "longer exists on the cluster"
            )
        status = status_view.parse_status(obj)
        if status.podName:
            return status.podName
        if not wait or status.phase in FINAL_PHASES:
            raise ConfigError(
                f"AGENT_ID {record.agent_id}: no Pod yet ({status.phase}); try "
                f"`kapsis logs {record.agent_id} --follow`"
            )
        time.sleep(1.0)


def logs(record: AgentStatus, *, follow: bool) -> Iterator[str]:
    """The agent container's log of the request's Pod."""
    cluster = connect(record.kube_context)
    pod = _pod_name(cluster, record, wait=follow)
    return cluster.pod_log(record.namespace or "default", pod, follow=follow)


def stop(record: AgentStatus) -> AgentStatus:
    """Mark the request stopped and delete its Pod; the operator then reports Failed/stopped."""
    store = StatusStore()
    namespace = record.namespace or "default"
    cluster = connect(record.kube_context)
    cluster.mark_stop(namespace, record.agent_id)
    obj = cluster.get_request(namespace, record.agent_id)
    pod = status_view.parse_status(obj).podName if obj else None
    if pod:
        cluster.delete_pod(namespace, pod)
    store.update(record.agent_id, stop_requested=True, message="stopping")
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    while obj is not None and time.monotonic() < deadline:
        status = status_view.parse_status(obj)
        if status.phase in FINAL_PHASES:
            return store.update(record.agent_id, **status_view.record_changes(status))
        time.sleep(0.2)
        obj = cluster.get_request(namespace, record.agent_id)
    current = store.read(record.agent_id) or record
    return current.model_copy(
        update={"message": "stop requested; the operator reports it as failed (stopped)"}
    )


def removes(record: AgentStatus) -> tuple[str, ...]:
    namespace = record.namespace or "default"
    return (
        f"AgentRequest {namespace}/{record.agent_id} (with its Pod and task ConfigMap)",
        str(StatusStore().path(record.agent_id)),
    )


def remove(record: AgentStatus) -> None:
    """Delete the request (its Pod and ConfigMap are owner-referenced) and the local record."""
    namespace = record.namespace or "default"
    cluster = connect(record.kube_context)
    cluster.delete_request(namespace, record.agent_id)
    cluster.delete_config_map(namespace, names.task_config_map_name(record.agent_id))
    StatusStore().delete(record.agent_id)
