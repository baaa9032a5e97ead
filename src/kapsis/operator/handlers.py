"""The operator's reconcile logic: AgentRequest create/resume/update/delete and the Pod watch.

Handlers are plain methods of :class:`Reconciler` (sync: kopf runs them in its thread pool,
since the kubernetes client blocks), registered on a kopf registry by :func:`register`. State
lives in the API server (the request's status, the Pod) and in the audit log, so a restarted
operator resumes where it stopped: creating a child that exists is fine, and a finished request
is left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

from kapsis.errors import ConfigError, ExitCode
from kapsis.k8s import resource as ar
from kapsis.k8s.names import (
    AGENT_EXIT_ANNOTATION,
    AGENT_FAILURE_ANNOTATION,
    MANAGED_BY_LABEL,
    MANAGED_BY_VALUE,
    REQUEST_LABEL,
    STOP_ANNOTATION,
)
from kapsis.k8s.render import render_request
from kapsis.k8s.resource import FINAL_PHASES
from kapsis.k8s.settings import OperatorSettings
from kapsis.operator.audit import OperatorAudit
from kapsis.operator.bridge import bridge
from kapsis.operator.kube import Kube, utc_now
from kapsis.operator.validation import RequestRejected, validate_request

log = logging.getLogger("kapsis.operator")

Ref = tuple[str, str, str]  # namespace, name, uid
AUDITED_RESULT_KEYS: Final = ("branch", "commitSha", "pushStatus", "message")
# Phases in which the Pod has started: a missing Pod then means a lost run.
STARTED_PHASES: Final = frozenset({"Preparing", "Running", "Finishing"})


def _ref(body: Mapping[str, Any]) -> Ref:
    meta = body.get("metadata") or {}
    return str(meta.get("namespace")), str(meta.get("name")), str(meta.get("uid"))


def _request_owner(meta: Mapping[str, Any]) -> tuple[str, str] | None:
    """(name, uid) of the AgentRequest controlling a Pod. The owner reference, not the label,
    names it: a label value is cut to 63 characters, and anyone can copy a label."""
    for owner in meta.get("ownerReferences") or ():
        if (
            owner.get("kind") == ar.KIND
            and str(owner.get("apiVersion", "")).startswith(f"{ar.GROUP}/")
            and owner.get("controller")
            and owner.get("name")
            and owner.get("uid")
        ):
            return str(owner["name"]), str(owner["uid"])
    return None


def _stop_requested(request: Mapping[str, Any]) -> bool:
    """Whether `kapsis stop` asked for the request to end (an annotation on the request)."""
    annotations = (request.get("metadata") or {}).get("annotations") or {}
    return annotations.get(STOP_ANNOTATION) == "true"


def _nothing_reported(pod: Mapping[str, Any]) -> bool:
    """A Pod the kubelet has not reported on yet (no container states, still Pending)."""
    status = pod.get("status") or {}
    return (
        status.get("phase") in (None, "Pending")
        and not status.get("reason")
        and not status.get("initContainerStatuses")
        and not status.get("containerStatuses")
    )


class Reconciler:
    """The operator's handlers, over one API client, one settings value and one audit book."""

    def __init__(self, kube: Kube, settings: OperatorSettings, audit: OperatorAudit) -> None:
        self.kube = kube
        self.settings = settings
        self.audit = audit

    # -- AgentRequest ----------------------------------------------------------------------

    def on_create(self, body: Mapping[str, Any], **_: Any) -> None:
        self.reconcile(body, resumed=False)

    def on_resume(self, body: Mapping[str, Any], **_: Any) -> None:
        self.reconcile(body, resumed=True)

    def reconcile(self, body: Mapping[str, Any], *, resumed: bool) -> None:
        """Validate, render, create the children (those that exist are kept), record it."""
        ref = _ref(body)
        namespace, name, uid = ref
        status = dict(body.get("status") or {})
        if status.get("phase") in FINAL_PHASES:
            return
        first = not status.get("phase")
        labels = self.kube.namespace_labels(namespace)
        try:
            spec = validate_request(body.get("spec"), labels, self.settings)
            rendered = render_request(name, namespace, uid, spec, self.settings)
        except ConfigError as error:
            self.reject(body, str(error), first=first, had_pod=bool(status.get("podName")))
            return
        pod_name = str(rendered.pod["metadata"]["name"])
        if _stop_requested(body):
            # `kapsis stop` before the Pod existed (or while the operator was away): never
            # start it; whatever was made for it goes.
            self._delete_children(ref)
            self._pod_vanished(body, status)
            return
        if status.get("phase") in STARTED_PHASES and not self.kube.pod_exists(namespace, pod_name):
            # Its Pod went while the operator was away: the run is lost, not to be redone.
            self._pod_vanished(body, status)
            return
        if first:
            self.audit.start(ref, request=f"{namespace}/{name}", uid=uid)
            self.audit.record(
                ref,
                "request_accepted",
                image=rendered.image,
                profile=spec.agent.profile,
                network_mode=spec.network.mode,
                security_profile=spec.security.profile,
                repository=spec.workspace.git.url,
                pod=pod_name,
            )
            # Status before the Pod: the Pod watch then always finds podName and a phase.
            self.kube.patch_request_status(
                namespace,
                name,
                {"phase": "Pending", "progress": 0, "podName": pod_name, "message": "accepted"},
            )
            self.kube.post_event(body, "Normal", "Accepted", f"creating Pod {pod_name}")
        for obj in rendered.objects():
            made = self.kube.create(obj)  # labelled and owner-referenced by the renderer
            if made and obj.get("kind") == "Pod":
                self.audit.record(ref, "pod_created", pod=pod_name, resumed=resumed)

    def reject(self, body: Mapping[str, Any], reason: str, *, first: bool, had_pod: bool) -> None:
        """Failed with exit code 2 (config), a Warning event and an audit record. A request
        that no longer passes (e.g. its namespace lost the open-network label) is stopped."""
        ref = _ref(body)
        namespace, name, uid = ref
        log.warning("rejected %s/%s: %s", namespace, name, reason)
        if first:
            self.audit.start(ref, request=f"{namespace}/{name}", uid=uid)
        self.audit.record(ref, "request_rejected", reason=reason)
        now = utc_now()
        self.kube.patch_request_status(
            namespace,
            name,
            {
                "phase": "Failed",
                "progress": 100,
                "message": reason,
                "exitCode": int(ExitCode.USAGE),
                "errorType": RequestRejected.error_type,
                "completedAt": now,
                "conditions": [
                    {
                        "type": "Accepted",
                        "status": "False",
                        "reason": "Rejected",
                        "message": reason,
                        "lastTransitionTime": now,
                    }
                ],
            },
        )
        self.kube.post_event(body, "Warning", "Rejected", reason)
        if had_pod:
            # After the status: the Pod watch then sees a finished request, not a lost Pod.
            self._delete_children(ref)
        self.audit.end(ref, phase="Failed", exitCode=int(ExitCode.USAGE), errorType="config")

    def on_update(self, body: Mapping[str, Any], diff: Any = (), **_: Any) -> None:
        """The spec is immutable once a Pod was made for it; before that (a rejected request
        being fixed), the changed spec is reconciled afresh."""
        ref = _ref(body)
        namespace, name, _uid = ref
        status = dict(body.get("status") or {})
        # kopf's diff paths are relative to the watched field (spec).
        fields = sorted({".".join(("spec", *map(str, change[1]))) for change in diff or ()})
        if status.get("podName"):
            message = (
                f"spec is immutable once the Pod exists (changed: {', '.join(fields) or 'spec'});"
                " the running Pod keeps the spec it started with: delete and re-create the "
                "request to change it"
            )
            self.audit.record(ref, "update_rejected", fields=fields)
            self.kube.post_event(body, "Warning", "SpecImmutable", message)
            return
        # Never got a Pod (rejected): judge the new spec like a new request.
        self.audit.record(ref, "spec_changed", fields=fields)
        fresh = dict(body)
        fresh["status"] = {}
        self.kube.patch_request_status(
            namespace,
            name,
            {
                "phase": None,
                "exitCode": None,
                "errorType": None,
                "completedAt": None,
                "conditions": [],
                "message": "re-validating the changed spec",
            },
        )
        self.reconcile(fresh, resumed=False)

    def on_delete(self, body: Mapping[str, Any], **_: Any) -> None:
        """Delete the children explicitly (owner references do it on a real cluster too, but
        an emulator or a cluster without the garbage collector would keep them)."""
        ref = _ref(body)
        deleted = self._delete_children(ref)
        phase = (body.get("status") or {}).get("phase")
        self.audit.record(ref, "request_deleted", phase=phase, deleted=deleted)
        if phase in FINAL_PHASES or phase is None:
            self.audit.seal(ref)
        else:
            self.audit.end(ref, phase="Deleted", previous_phase=phase)
        self.audit.forget(ref)

    def _delete_children(self, ref: Ref) -> list[str]:
        namespace, name, uid = ref
        deleted = []
        for kind, child in self.kube.children(namespace, name, uid):
            if self.kube.delete(kind, namespace, child):
                deleted.append(f"{kind}/{child}")
        return deleted

    # -- Pods ------------------------------------------------------------------------------

    def on_pod_event(self, event: Mapping[str, Any], body: Mapping[str, Any], **_: Any) -> None:
        """Bridge a Pod's state (as the kubelet reports it) to its request's status."""
        meta = body.get("metadata") or {}
        namespace = str(meta.get("namespace"))
        if event.get("type") != "DELETED" and _nothing_reported(body):
            return  # the request already says Pending; spare the API server two calls
        owner = _request_owner(meta)
        if owner is None:
            return  # a Pod that merely carries the label does not speak for any request
        request_name, owner_uid = owner
        request = self.kube.read_request(namespace, request_name)
        if request is None or (request.get("metadata") or {}).get("deletionTimestamp"):
            return
        ref = _ref(request)
        if ref[2] != owner_uid:
            return  # owned by an earlier request of the same name
        current = dict(request.get("status") or {})
        if event.get("type") == "DELETED":
            self._pod_vanished(request, current)
            return
        bridged = bridge(body, current, utc_now())
        annotations = meta.get("annotations") or {}
        if bridged.agent_exit_code is not None and AGENT_EXIT_ANNOTATION not in annotations:
            self.audit.record(
                ref,
                "agent_exited",
                exit_code=bridged.agent_exit_code,
                oom_killed=bridged.agent_oom_killed,
                reported_by="kubelet",
            )
            pod_name = str(meta.get("name"))
            outcome = {AGENT_EXIT_ANNOTATION: str(bridged.agent_exit_code)}
            failure = self._reported_failure(request, namespace, pod_name, bridged.agent_exit_code)
            if failure is not None:
                self.audit.record(ref, "agent_reported_failure", message=failure)
                outcome[AGENT_FAILURE_ANNOTATION] = failure
            # This releases the finisher: it commits and pushes once it sees the annotation
            # (both at once: it must never see the exit code without the failure).
            self.kube.annotate_pod(namespace, pod_name, outcome)
        changes = {k: v for k, v in bridged.status.items() if current.get(k) != v}
        if not changes:
            return
        old_phase, new_phase = current.get("phase"), bridged.status.get("phase")
        if bridged.finisher_result is not None and new_phase in FINAL_PHASES:
            result = {k: bridged.finisher_result.get(k) for k in AUDITED_RESULT_KEYS}
            self.audit.record(
                ref, "finisher_result", exit_code=bridged.finisher_exit_code, **result
            )
        if new_phase != old_phase:
            self.audit.record(ref, "phase_changed", previous=old_phase, phase=new_phase)
        if changes.get("blockedRequests"):
            self.audit.record(ref, "gateway_report", blocked_requests=changes["blockedRequests"])
        self.kube.patch_request_status(namespace, request_name, changes)
        if new_phase in FINAL_PHASES and old_phase not in FINAL_PHASES:
            final = bridged.status
            kind = "Normal" if new_phase == "Complete" else "Warning"
            self.kube.post_event(request, kind, str(new_phase), str(final.get("message")))
            self.audit.end(
                ref,
                phase=new_phase,
                exitCode=final.get("exitCode"),
                errorType=final.get("errorType"),
                agentExitCode=final.get("agentExitCode"),
                branch=final.get("branch"),
                commitSha=final.get("commitSha"),
                pushStatus=final.get("pushStatus"),
            )

    def _reported_failure(
        self, request: Mapping[str, Any], namespace: str, pod: str, exit_code: int
    ) -> str | None:
        """What the agent's own output says of its failure (its profile's failure signs, as a
        local run reads them in its transcript), from the end of its container's log.

        Said by the reason and the sign alone, never the agent's line: the request's status
        outlives the Pod, and no redactor here knows the run's secrets. A log that cannot be
        read, for a CLI whose exit 0 can lie, fails closed (no push)."""
        from kapsis.agents import find_profile
        from kapsis.sandbox.agent_outcome import MAX_READ, TAIL_LINES, failure_in

        spec = request.get("spec") or {}
        try:
            profile = find_profile(str((spec.get("agent") or {}).get("profile") or "shell"))
        except Exception:  # validated at creation; a profile gone since decides nothing
            return None
        signs = tuple(sign for sign in profile.failure if sign.exit_0_too or exit_code != 0)
        if not signs:
            return None
        text = self.kube.agent_log_tail(namespace, pod, TAIL_LINES, MAX_READ)
        if text is None:
            if exit_code != 0:
                return None  # failed anyway; only the reason is missing
            return (
                f"{profile.name} exited 0, but the end of its log, which says whether it gave "
                "up on its model, could not be read"
            )
        failure = failure_in(profile.name, text, signs, exit_code, show_line=False)
        return None if failure is None else str(failure)

    def _pod_vanished(self, request: Mapping[str, Any], current: Mapping[str, Any]) -> None:
        if current.get("phase") in FINAL_PHASES:
            return
        ref = _ref(request)
        if _stop_requested(request):
            # The same error type as a local `kapsis stop`.
            error_type, message = "stopped", "stopped by `kapsis stop`"
        else:
            error_type, message = "killed", "the Pod was deleted before the request finished"
        if not current.get("phase"):
            self.audit.start(ref, request=f"{ref[0]}/{ref[1]}", uid=ref[2])
        self.audit.record(ref, "phase_changed", previous=current.get("phase"), phase="Failed")
        self.kube.patch_request_status(
            ref[0],
            ref[1],
            {
                "phase": "Failed",
                "progress": 100,
                "message": message,
                "exitCode": int(ExitCode.KILLED),
                "errorType": error_type,
                "completedAt": utc_now(),
            },
        )
        self.kube.post_event(request, "Warning", "Failed", message)
        self.audit.end(ref, phase="Failed", exitCode=int(ExitCode.KILLED), errorType=error_type)


def register(registry: Any, reconciler: Reconciler) -> None:
    """Register ``reconciler``'s handlers on a kopf registry."""
    import kopf

    resource = (ar.GROUP, ar.VERSION, ar.PLURAL)
    kopf.on.create(*resource, registry=registry, id="create")(reconciler.on_create)
    kopf.on.resume(*resource, registry=registry, id="resume")(reconciler.on_resume)
    kopf.on.update(*resource, registry=registry, id="update", field="spec")(reconciler.on_update)
    kopf.on.delete(*resource, registry=registry, id="delete")(reconciler.on_delete)
    kopf.on.event(
        "",
        "v1",
        "pods",
        registry=registry,
        id="pod",
        labels={REQUEST_LABEL: kopf.PRESENT, MANAGED_BY_LABEL: MANAGED_BY_VALUE},
    )(reconciler.on_pod_event)
