"""The operator end to end: AgentRequest -> Pod, NetworkPolicy, ConfigMaps; status; cleanup.

The real operator (kapsis.operator, kopf) runs in-process against the emulator (or the cluster
of KAPSIS_TEST_KUBECONFIG). Where a test needs Pod progress it plays the kubelet by patching
the Pod's status, which only the emulator allows: those tests say so when skipped.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from kapsis.k8s import resource as ar
from kapsis.k8s.names import (
    AGENT_CONTAINER,
    AGENT_EXIT_ANNOTATION,
    AGENT_FAILURE_ANNOTATION,
    CLONE_CONTAINER,
    FINISHER_CONTAINER,
    GATEWAY_CONTAINER,
    STOP_ANNOTATION,
)
from kapsis.k8s.render import object_name, pod_name, render_request
from kapsis.k8s.resource import AgentRequestSpec
from tests.k8s import kubelet as k
from tests.k8s.cluster import wait_for
from tests.k8s.conftest import OperatorUnderTest
from tests.k8s.requests import Requests, request_body


def _containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = pod["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


def _mounts(container: dict[str, Any]) -> set[str]:
    return {m["name"] for m in container.get("volumeMounts", [])}


def _added_caps(container: dict[str, Any]) -> set[str]:
    return set(((container.get("securityContext") or {}).get("capabilities") or {}).get("add", []))


def test_a_request_yields_a_pod_and_network_policy_with_the_intended_security(
    operator: OperatorUnderTest, k8s_cluster: Any
):
    requests = operator.requests
    made = requests.create("app")
    pod = requests.wait_pod("app")
    status = requests.wait_accepted("app")
    assert status["podName"] == pod_name("app")

    # The owner is the request (deleting it deletes the Pod on a real cluster).
    [owner] = pod["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "AgentRequest",
        "app",
        made["metadata"]["uid"],
    )
    assert owner["controller"] is True

    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    containers = _containers(pod)
    assert set(containers) == {
        CLONE_CONTAINER,
        GATEWAY_CONTAINER,
        AGENT_CONTAINER,
        FINISHER_CONTAINER,
    }

    agent = containers[AGENT_CONTAINER]
    context = agent["securityContext"]
    assert context["runAsUser"] == 1000 and context["runAsNonRoot"] is True
    assert context["allowPrivilegeEscalation"] is False and context["privileged"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost")
    assert context["readOnlyRootFilesystem"] is False  # the standard profile
    limits = agent["resources"]["limits"]
    # (an API server writes 1000m as 1)
    assert limits["memory"] == "1Gi" and limits["cpu"] in ("1000m", "1")
    # The agent never mounts the credentials, nor the volume that carries the exit annotation.
    assert "credentials" not in _mounts(agent) and "pod-info" not in _mounts(agent)
    assert "credentials" in _mounts(containers[CLONE_CONTAINER])
    assert "credentials" in _mounts(containers[FINISHER_CONTAINER])
    assert "pod-info" in _mounts(containers[FINISHER_CONTAINER])
    # Only the gateway holds NET_ADMIN.
    holders = {name for name, c in containers.items() if "NET_ADMIN" in _added_caps(c)}
    assert holders == {GATEWAY_CONTAINER}
    assert containers[GATEWAY_CONTAINER]["restartPolicy"] == "Always"
    assert "startupProbe" in containers[GATEWAY_CONTAINER]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["workspace"]["emptyDir"]["sizeLimit"] == "2Gi"

    policy = client.NetworkingV1Api(requests.api).read_namespaced_network_policy(
        object_name("app"), requests.namespace, _preload_content=False
    )
    import json

    policy = json.loads(policy.data)
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert not policy["spec"].get("ingress")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    for rule in policy["spec"]["egress"]:
        assert rule.get("ports"), f"an egress rule without ports: {rule}"
    dns = policy["spec"]["egress"][0]["ports"]
    assert {(p["protocol"], p["port"]) for p in dns} == {("UDP", 53), ("TCP", 53)}

    task = requests.core.read_namespaced_config_map(object_name("app", "task"), requests.namespace)
    assert task.data == {"task-spec.md": "make test"}

    if not k8s_cluster.is_real:
        # Exactly what the renderer makes: the operator adds nothing and drops nothing.
        parsed = AgentRequestSpec.model_validate(made["spec"])
        rendered = render_request(
            "app", requests.namespace, made["metadata"]["uid"], parsed, operator.settings
        )
        assert pod["spec"] == rendered.pod["spec"]
        assert policy["spec"] == rendered.network_policy["spec"]
    assert requests.wait_event("app", "Accepted").type == "Normal"


def test_the_strict_profile_gets_a_read_only_root(operator: OperatorUnderTest):
    requests = operator.requests
    requests.create("strict", security={"profile": "strict"})
    agent = _containers(requests.wait_pod("strict"))[AGENT_CONTAINER]
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True


def test_status_follows_the_pod_to_complete(operator: OperatorUnderTest, emulator_only: None):
    requests = operator.requests
    requests.create("run")
    requests.wait_pod("run")
    requests.wait_phase("run", "Pending")

    def annotations() -> dict[str, str]:
        return requests.pod_dict("run")["metadata"].get("annotations") or {}

    steps = [
        (k.cloning(), "Preparing", 10),
        (k.gateway_starting(), "Preparing", 25),
        (k.agent_running(), "Running", 50),
    ]
    for pod_status, phase, progress in steps:
        requests.kubelet("run", pod_status)
        wait_for(
            f"progress {progress}", lambda p=progress: requests.status("run").get("progress") == p
        )
        assert requests.status("run")["phase"] == phase
        assert AGENT_EXIT_ANNOTATION not in annotations()  # the agent has not ended yet

    requests.kubelet("run", k.agent_done(0))
    requests.wait_phase("run", "Finishing")
    assert wait_for("the exit annotation", lambda: annotations().get(AGENT_EXIT_ANNOTATION)) == "0"

    requests.kubelet("run", k.finished())
    status = requests.wait_phase("run", "Complete")
    assert status["exitCode"] == 0 and status["agentExitCode"] == 0 and status["progress"] == 100
    assert status["branch"] == "kapsis/req" and status["pushStatus"] == "verified"
    assert status["commitSha"] == "0123456789abcdef0123456789abcdef01234567"
    assert status["startedAt"] == k.T1 and status["completedAt"]
    assert requests.wait_event("run", "Complete").type == "Normal"


def test_the_exit_annotation_is_written_only_after_the_agent_terminated(
    operator: OperatorUnderTest, k8s_cluster: Any, emulator_only: None
):
    requests = operator.requests
    requests.create("order")
    requests.wait_pod("order")
    for pod_status in (k.cloning(), k.gateway_starting(), k.agent_running(), k.agent_done(4)):
        requests.kubelet("order", pod_status)
    requests.wait_phase("order", "Finishing")
    wait_for(
        "the annotation",
        lambda: (
            AGENT_EXIT_ANNOTATION
            in (requests.pod_dict("order")["metadata"].get("annotations") or {})
        ),
    )
    # Every stored version of the Pod: wherever the annotation is, the kubelet had already
    # reported the agent terminated, with that very exit code.
    versions = k8s_cluster.history("v1/pods", requests.namespace, pod_name("order"))
    annotated = [
        v for v in versions if AGENT_EXIT_ANNOTATION in (v["metadata"].get("annotations") or {})
    ]
    assert annotated, "no version carries the annotation"
    for version in annotated:
        agent = next(
            c for c in version["status"]["containerStatuses"] if c["name"] == AGENT_CONTAINER
        )
        assert agent["state"]["terminated"]["exitCode"] == 4
        assert version["metadata"]["annotations"][AGENT_EXIT_ANNOTATION] == "4"


def _drive_to_end(requests: Requests, name: str, final: dict[str, Any]) -> dict[str, Any]:
    requests.wait_pod(name)
    requests.kubelet(name, k.agent_running())
    requests.wait_phase(name, "Running")
    requests.kubelet(name, final)
    return requests.wait_phase(name, "Failed")


def test_agent_failure_oom_and_push_failure_map_to_exit_codes(
    operator: OperatorUnderTest, emulator_only: None
):
    requests = operator.requests
    cases = {
        "fails": (k.finished(agent_code=3), 1, "agent_failed", 3),
        "oom": (k.finished(agent_code=137, agent_reason="OOMKilled"), 5, "oom", 137),
        "nopush": (
            k.finished(finisher_code=7, finisher_message=k.result_message(push="failed")),
            7,
            "push_failed",
            0,
        ),
    }
    for name in cases:
        requests.create(name)
    for name, (final, exit_code, error_type, agent_exit) in cases.items():
        status = _drive_to_end(requests, name, final)
        assert (status["exitCode"], status["errorType"], status["agentExitCode"]) == (
            exit_code,
            error_type,
            agent_exit,
        ), name
        annotations = requests.pod_dict(name)["metadata"]["annotations"]
        assert annotations[AGENT_EXIT_ANNOTATION] == str(agent_exit)
        assert requests.wait_event(name, "Failed").type == "Warning"


def test_a_clone_failure_fails_the_request_as_a_sandbox_error(
    operator: OperatorUnderTest, emulator_only: None
):
    requests = operator.requests
    requests.create("noclone")
    requests.wait_pod("noclone")
    requests.kubelet(
        "noclone", k.pod_status(phase="Failed", clone=k.terminated(128, message="auth failed"))
    )
    status = requests.wait_phase("noclone", "Failed")
    assert (status["exitCode"], status["errorType"]) == (3, "sandbox")
    assert "auth failed" in status["message"]
    annotations = requests.pod_dict("noclone")["metadata"].get("annotations") or {}
    assert AGENT_EXIT_ANNOTATION not in annotations  # the agent never ran: nothing to release


def test_a_result_planted_in_the_agents_termination_message_is_ignored(
    operator: OperatorUnderTest, emulator_only: None
):
    """Adversarial: the agent writes the finisher's result JSON to its own termination log."""
    requests = operator.requests
    forged = k.result_message(branch="main", sha="f" * 40, push="verified", message="all good")
    requests.create("forged")
    requests.create("control")
    attack = _drive_to_end(
        requests,
        "forged",
        k.finished(
            agent_message=forged, finisher_code=8, finisher_message='{"message": "no commit"}'
        ),
    )
    assert attack["exitCode"] == 8 and attack["errorType"] == "commit_failed"
    assert "branch" not in attack and "commitSha" not in attack and "pushStatus" not in attack
    assert "all good" not in attack["message"]
    # Control: the same JSON from the finisher is the result.
    requests.wait_pod("control")
    requests.kubelet("control", k.finished(finisher_message=forged))
    control = requests.wait_phase("control", "Complete")
    assert (control["branch"], control["commitSha"], control["pushStatus"]) == (
        "main",
        "f" * 40,
        "verified",
    )


def test_deleting_a_request_removes_its_pod_config_maps_and_network_policy(
    operator: OperatorUnderTest,
):
    requests = operator.requests
    requests.create("gone")
    requests.wait_pod("gone")
    expected = {
        f"Pod/{pod_name('gone')}",
        f"ConfigMap/{object_name('gone', 'task')}",
        f"ConfigMap/{object_name('gone', 'gateway')}",
        f"NetworkPolicy/{object_name('gone')}",
    }
    wait_for("all children", lambda: set(requests.children("gone")) == expected)
    requests.delete("gone")
    wait_for("the request to go", lambda: requests.get("gone") is None, timeout=30)
    wait_for("its children to go", lambda: requests.children("gone") == [], timeout=30)


def test_a_deleted_pod_fails_its_request(operator: OperatorUnderTest, emulator_only: None):
    requests = operator.requests
    requests.create("lost")
    requests.wait_pod("lost")
    requests.kubelet("lost", k.agent_running())
    requests.wait_phase("lost", "Running")
    requests.core.delete_namespaced_pod(pod_name("lost"), requests.namespace)
    status = requests.wait_phase("lost", "Failed")
    assert (status["exitCode"], status["errorType"]) == (5, "killed")


def test_a_request_stopped_before_its_pod_existed_never_gets_one(operator: OperatorUnderTest):
    requests = operator.requests
    body = request_body("halted")
    body["metadata"]["annotations"] = {STOP_ANNOTATION: "true"}
    requests.custom.create_namespaced_custom_object(
        ar.GROUP, ar.VERSION, requests.namespace, ar.PLURAL, body
    )
    status = requests.wait_phase("halted", "Failed")
    assert (status["exitCode"], status["errorType"]) == (5, "stopped")
    # Control: the same request without the annotation does get its Pod.
    requests.create("running")
    requests.wait_pod("running")
    pods = requests.core.list_namespaced_pod(requests.namespace).items
    assert [pod.metadata.name for pod in pods] == [pod_name("running")]


def test_spec_changes_after_the_pod_exists_are_refused(operator: OperatorUnderTest):
    requests = operator.requests
    requests.create("fixed")
    before = requests.wait_pod("fixed")
    requests.patch_spec("fixed", {"task": {"inline": "rm -rf /"}})
    event = requests.wait_event("fixed", "SpecImmutable")
    assert event.type == "Warning" and "spec.task" in event.message
    after = requests.pod_dict("fixed")["spec"]
    # (the scheduler adds nodeName on a real cluster; the containers are what must not change)
    for key in ("initContainers", "containers", "volumes"):
        assert after[key] == before["spec"][key]
    task = requests.core.read_namespaced_config_map(
        object_name("fixed", "task"), requests.namespace
    )
    assert task.data == {"task-spec.md": "make test"}


def test_several_requests_at_once_are_handled_independently(
    operator: OperatorUnderTest, emulator_only: None
):
    requests = operator.requests
    names = [f"par-{i}" for i in range(6)]
    for name in names:
        requests.create(name)
    for name in names:
        requests.wait_pod(name)
    # Each Pod gets a different ending; each request must report its own.
    for i, name in enumerate(names):
        requests.kubelet(
            name, k.finished(agent_code=i, finisher_message=k.result_message(branch=name))
        )
    for i, name in enumerate(names):
        status = requests.wait_phase(name, "Complete" if i == 0 else "Failed")
        assert status["agentExitCode"] == i and status["branch"] == name
        assert status["podName"] == pod_name(name)
        assert status["exitCode"] == (0 if i == 0 else 1)
    pods = requests.core.list_namespaced_pod(requests.namespace).items
    assert sorted(p.metadata.name for p in pods) == sorted(pod_name(n) for n in names)


def test_a_restarted_operator_resumes_without_duplicating(
    operator: OperatorUnderTest, run_operator: Any, kubeconfig: Any, operator_settings: Any
):
    from kapsis.operator.connect import client_configuration
    from kapsis.operator.runner import build_operator

    requests = operator.requests
    requests.create("resumed")
    requests.wait_pod("resumed")
    requests.wait_accepted("resumed")
    operator.thread.stop()
    requests.create("while-down")
    built = build_operator(operator_settings, client_configuration(kubeconfig))
    run_operator(built.registry, settings=built.kopf_settings, namespaces=(requests.namespace,))
    requests.wait_pod("while-down")  # made by the new instance on start
    wait_for(
        "both Pods", lambda: len(requests.core.list_namespaced_pod(requests.namespace).items) == 2
    )
    assert requests.status("resumed")["podName"] == pod_name("resumed")
    assert len([e for e in requests.events("resumed") if e.reason == "Accepted"]) == 1


def test_a_cluster_wide_operator_handles_any_namespace(
    api_client: Any,
    kubeconfig: Any,
    make_namespace: Any,
    operator_settings: Any,
    run_operator: Any,
    k8s_cluster: Any,
):
    if k8s_cluster.is_real:
        pytest.skip("a cluster-wide test operator would act on the real cluster's other requests")
    from kapsis.operator.connect import client_configuration
    from kapsis.operator.runner import build_operator

    built = build_operator(operator_settings, client_configuration(kubeconfig))
    run_operator(built.registry, settings=built.kopf_settings, clusterwide=True)
    requests = Requests(api_client, make_namespace("kapsis-anywhere"))
    requests.create("anywhere")
    requests.wait_pod("anywhere")
    assert requests.wait_accepted("anywhere")["podName"] == pod_name("anywhere")


def test_the_pod_really_starts_on_a_real_cluster(
    operator: OperatorUnderTest, real_cluster_only: None
):
    """On a real cluster the kubelet, not the test, moves the Pod on: the request must leave
    Pending (to Preparing and on, or to Failed with a sandbox/image reason if the cluster
    cannot pull the Kapsis images)."""
    requests = operator.requests
    requests.create("real")
    requests.wait_pod("real", timeout=30)

    def moved() -> dict[str, Any] | None:
        status = requests.status("real")
        return status if status.get("phase") not in (None, "Pending") else None

    status = wait_for("the request to leave Pending", moved, timeout=180, interval=1)
    if status["phase"] == "Failed":
        assert status["errorType"] in ("image", "sandbox"), status


def test_a_pod_lost_while_the_operator_was_away_fails_its_request_and_is_not_rerun(
    operator: OperatorUnderTest,
    run_operator: Any,
    kubeconfig: Any,
    operator_settings: Any,
    emulator_only: None,
):
    from kapsis.operator.connect import client_configuration
    from kapsis.operator.runner import build_operator

    requests = operator.requests
    requests.create("away")
    requests.wait_pod("away")
    requests.kubelet("away", k.agent_running())
    requests.wait_phase("away", "Running")
    operator.thread.stop()
    requests.core.delete_namespaced_pod(pod_name("away"), requests.namespace)
    built = build_operator(operator_settings, client_configuration(kubeconfig))
    run_operator(built.registry, settings=built.kopf_settings, namespaces=(requests.namespace,))
    status = requests.wait_phase("away", "Failed")
    assert (status["exitCode"], status["errorType"]) == (5, "killed")
    assert requests.pod("away") is None  # the agent is not run a second time


GAVE_UP = (
    b"Retrying in 32.0 seconds...\n"
    b"litellm.InternalServerError: InternalServerError: OpenAIException - Connection error.\n"
    b"The API provider's servers are down or overloaded.\n"
)


def test_an_agent_whose_output_says_it_failed_ends_agent_error_and_is_not_pushed(
    operator: OperatorUnderTest, k8s_cluster: Any, emulator_only: None
):
    """Aider exits 0 when it gave up on its model: the operator reads the end of its log as a
    local run reads its transcript, and tells the finisher and the status why, at once, by the
    sign alone (the agent's line may hold a secret, and the status outlives the Pod). A log it
    cannot read fails closed."""
    import kmock

    requests = operator.requests
    secrets = {"secrets": {"OPENAI_API_KEY": {"name": "llm", "key": "key"}}}
    logs: dict[str, Any] = {
        "gaveup": GAVE_UP + b"the key: sk-live-0123456789\n",
        "fine": b"Applied edit to hello.txt\nCommit 1a2b3c4 Add it\n",
        "blind": kmock.Response(status=403, payload={"kind": "Status", "code": 403}),
    }
    for name, log in logs.items():
        requests.create(name, agent={"profile": "aider"}, environment=secrets)
        path = f"/api/v1/namespaces/{requests.namespace}/pods/{pod_name(name)}/log"
        k8s_cluster.emulator["get", path, {"container": AGENT_CONTAINER}] << log
    for name in logs:
        requests.wait_pod(name)
        requests.kubelet(name, k.agent_running())
        requests.wait_phase(name, "Running")
        requests.kubelet(name, k.agent_done(0))

    def annotations(name: str) -> dict[str, str]:
        return dict(requests.pod_dict(name)["metadata"].get("annotations") or {})

    for name in logs:
        wait_for(f"{name}'s exit code", lambda n=name: AGENT_EXIT_ANNOTATION in annotations(n))
    failure = (
        "aider could not reach its model, or its server failed "
        "(its output says 'litellm.InternalServerError')"
    )
    assert annotations("gaveup")[AGENT_EXIT_ANNOTATION] == "0"
    assert annotations("gaveup")[AGENT_FAILURE_ANNOTATION] == failure
    assert AGENT_FAILURE_ANNOTATION not in annotations("fine")  # control: the same CLI, fine
    assert "could not be read" in annotations("blind")[AGENT_FAILURE_ANNOTATION]

    for name in logs:
        requests.kubelet(name, k.finished())
    status = requests.wait_phase("gaveup", "Failed")
    assert (status["exitCode"], status["errorType"], status["message"]) == (
        1,
        "agent_error",
        failure,
    )
    assert "sk-live" not in str(requests.get("gaveup"))
    assert requests.wait_phase("blind", "Failed")["errorType"] == "agent_error"
    assert requests.wait_phase("fine", "Complete").get("errorType") is None
