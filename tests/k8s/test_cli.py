"""`kapsis run --backend k8s` and status/logs/stop/cleanup of a k8s run, through the CLI.

The CLI runs in-process (typer's CliRunner) with KUBECONFIG naming the harness's cluster. The
test plays the operator: it patches the request's status (the operator's status bridge is tested
on its own branch), so what is checked here is the CLI's side of the contract.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from typer.testing import CliRunner

from kapsis.cli.app import app
from kapsis.k8s import names, resource as ar
from kapsis.k8s.resource import AgentRequestSpec
from kapsis.k8s.status_view import PHASES
from kapsis.status import StatusStore
from tests.k8s.cluster import (
    AR_RESOURCE,
    Cluster,
    EmulatedCluster,
    wait_for,
    write_kubeconfig,
)

URL = "https://git.example.test/team/app.git"
Result = Any


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kubeconfig: Path) -> Path:
    """A git project with an origin, a private Kapsis home, and KUBECONFIG set."""
    for name in ("kapsis-home", "kapsis-config", "home"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("KAPSIS_HOME", str(tmp_path / "kapsis-home"))
    monkeypatch.setenv("KAPSIS_CONFIG_DIR", str(tmp_path / "kapsis-config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    root = tmp_path / "app"
    root.mkdir()
    monkeypatch.chdir(root)

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    git("config", "user.name", "Ada")
    git("config", "user.email", "ada@example.test")
    (root / "README.md").write_text("# app\n")
    git("add", ".")
    git("commit", "-q", "-m", "initial")
    git("remote", "add", "origin", URL)
    git("update-ref", "refs/remotes/origin/main", "HEAD")
    return root


def kapsis(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def custom(api_client: Any) -> Any:
    return client.CustomObjectsApi(api_client)


def get_request(api_client: Any, namespace: str, name: str) -> dict[str, Any] | None:
    items = custom(api_client).list_namespaced_custom_object(
        ar.GROUP, ar.VERSION, namespace, ar.PLURAL
    )["items"]
    return next((i for i in items if i["metadata"]["name"] == name), None)


def set_status(api_client: Any, namespace: str, name: str, status: dict[str, Any]) -> None:
    custom(api_client).patch_namespaced_custom_object_status(
        ar.GROUP, ar.VERSION, namespace, ar.PLURAL, name, {"status": status}
    )


def seen(name: str, status: dict[str, Any]) -> bool:
    record = StatusStore().read(name)
    return record is not None and record.phase == PHASES[status["phase"]]


@pytest.fixture
def operator_plays(api_client: Any) -> Iterator[Callable[..., None]]:
    """Play the operator in a thread: once the request exists, write each status in turn."""
    threads: list[threading.Thread] = []
    errors: list[BaseException] = []

    def play(namespace: str, name: str, *statuses: dict[str, Any]) -> None:
        def run() -> None:
            try:
                wait_for(f"AgentRequest {name}", lambda: get_request(api_client, namespace, name))
                for status in statuses:
                    set_status(api_client, namespace, name, status)
                    # Pace like an operator: the next change after the CLI has seen this one.
                    wait_for(f"the CLI to see {status['phase']}", lambda s=status: seen(name, s))
            except BaseException as error:  # reported by the fixture
                errors.append(error)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)

    yield play
    for thread in threads:
        thread.join(15)
    assert not errors, errors


RUNNING = {"phase": "Running", "progress": 30, "message": "agent running", "podName": "p1"}


def test_dry_run_prints_the_request_and_needs_no_cluster(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    spec = tmp_path / "fix.md"
    spec.write_text("# Fix it\n")
    result = kapsis(
        "run", str(project), "--backend", "k8s", "--spec", str(spec),
        "--agent-id", "dry1", "--namespace", "team", "--dry-run",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config_map, request = yaml.safe_load_all(result.stdout)
    assert config_map["kind"] == "ConfigMap" and config_map["data"]["task.md"] == "# Fix it\n"
    assert request["kind"] == "AgentRequest"
    assert request["metadata"] == {
        "name": "dry1",
        "namespace": "team",
        "labels": {"app.kubernetes.io/managed-by": "kapsis"},
    }
    spec_model = AgentRequestSpec.model_validate(request["spec"])
    assert spec_model.workspace.git.url == URL and spec_model.workspace.git.baseBranch == "main"
    assert spec_model.task.configMapRef is not None
    assert StatusStore().all() == []  # nothing was recorded


def test_run_follows_the_request_to_complete_and_exits_0(
    project: Path, api_client: Any, namespace: str, operator_plays: Callable[..., None]
) -> None:
    operator_plays(
        namespace,
        "ok1",
        {"phase": "Preparing", "progress": 10, "message": "cloning"},
        RUNNING,
        {
            "phase": "Complete",
            "progress": 100,
            "message": "pushed kapsis/x",
            "exitCode": 0,
            "agentExitCode": 0,
            "branch": "fix/ok",
            "commitSha": "a" * 40,
            "pushStatus": "verified",
        },
    )
    result = kapsis(
        "run", str(project), "--backend", "k8s", "-n", namespace, "--agent-id", "ok1",
        "-t", "make test", "--branch", "fix/ok", "--push",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Running 30%: agent running" in result.stderr
    assert "agent ok1: pushed kapsis/x" in result.stderr
    created = get_request(api_client, namespace, "ok1")
    assert created is not None
    assert created["spec"]["task"] == {"inline": "make test"}
    assert created["spec"]["workspace"]["git"]["push"] is True
    record = StatusStore().read("ok1")
    assert record is not None and record.backend == "k8s" and record.namespace == namespace
    assert (record.phase, record.exit_code, record.commit_sha) == ("complete", 0, "a" * 40)
    assert record.push_status == "pushed"


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ({"exitCode": 1, "errorType": "agent_failed", "agentExitCode": 3}, 1),
        ({"exitCode": 6, "errorType": "timeout"}, 6),
        ({"exitCode": 7, "errorType": "push_failed", "pushStatus": "failed"}, 7),
        ({"errorType": "timeout"}, 6),  # no exitCode: derived from the errors table
    ],
)
def test_a_failed_request_exits_with_the_local_exit_code(
    project: Path,
    namespace: str,
    operator_plays: Callable[..., None],
    status: dict[str, Any],
    code: int,
) -> None:
    operator_plays(namespace, "bad1", RUNNING, {"phase": "Failed", "message": "no", **status})
    result = kapsis(
        "run", str(project), "--backend", "k8s", "-n", namespace, "--agent-id", "bad1",
        "-t", "false", "--json",
    )  # fmt: skip
    assert result.exit_code == code, result.output
    payload = json.loads(result.stdout)
    assert payload["exit_code"] == code and payload["error_type"] == status["errorType"]
    assert payload["agent_exit_code"] == status.get("agentExitCode")
    record = StatusStore().read("bad1")
    assert record is not None and (record.phase, record.exit_code) == ("failed", code)


def test_detach_returns_at_once_and_status_reads_the_cluster(
    project: Path, api_client: Any, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = kapsis(
        "run", str(project), "--backend", "k8s", "-n", namespace, "--agent-id", "det1",
        "-t", "sleep 1000", "--detach",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "agent det1 started" in result.stderr
    assert get_request(api_client, namespace, "det1") is not None
    set_status(api_client, namespace, "det1", {**RUNNING, "progress": 40})
    shown = json.loads(kapsis("status", "det1", "--json").stdout)
    assert (shown["phase"], shown["progress"], shown["backend"]) == ("running", 40, "k8s")
    assert shown["message"] == "agent running" and shown["namespace"] == namespace

    # The cluster gone: status still answers, saying so, from the local record.
    dead = write_kubeconfig(tmp_path / "dead", "http://127.0.0.1:9")
    monkeypatch.setenv("KUBECONFIG", str(dead))
    result = kapsis("status", "det1", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["message"].startswith("cluster unreachable: ")
    assert shown["phase"] == "running"
    assert kapsis("status").exit_code == 0


def test_logs_read_the_agent_containers_log(
    project: Path, api_client: Any, namespace: str, k8s_cluster: Cluster, emulator_only: None
) -> None:
    assert kapsis(
        "run", str(project), "--backend", "k8s", "-n", namespace, "--agent-id", "log1",
        "-t", "echo hi", "--detach",
    ).exit_code == 0  # fmt: skip
    assert kapsis("logs", "log1").exit_code == 2  # no Pod yet: says so
    set_status(api_client, namespace, "log1", {**RUNNING, "podName": "log1-pod"})
    emulator = k8s_cluster.emulator  # type: ignore[union-attr]
    path = f"/api/v1/namespaces/{namespace}/pods/log1-pod/log"
    # The more specific reaction first: kmock answers with the first that matches.
    emulator["get", path, {"container": "agent", "follow": "true"}] << b"streamed\n"
    emulator["get", path, {"container": "agent"}] << b"hello from the agent\nsecond line\n"
    result = kapsis("logs", "log1")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["hello from the agent", "second line"]
    result = kapsis("logs", "log1", "--follow")  # the stream ends when the server closes it
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["streamed"]


def test_stop_marks_the_request_and_deletes_its_pod(
    project: Path, api_client: Any, namespace: str, operator_plays: Callable[..., None]
) -> None:
    assert kapsis(
        "run", str(project), "--backend", "k8s", "-n", namespace, "--agent-id", "stop1",
        "-t", "sleep 1000", "--detach",
    ).exit_code == 0  # fmt: skip
    core = client.CoreV1Api(api_client)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "stop1-pod"},
        "spec": {"containers": [{"name": "agent", "image": "x"}]},
    }
    core.create_namespaced_pod(namespace, pod)
    set_status(api_client, namespace, "stop1", {**RUNNING, "podName": "stop1-pod"})

    def operator_sees_the_stop() -> None:
        def stopped() -> bool:
            obj = get_request(api_client, namespace, "stop1") or {}
            return (obj["metadata"].get("annotations") or {}).get(names.STOP_ANNOTATION) == "true"

        wait_for("the stop annotation", stopped)
        failed = {"phase": "Failed", "exitCode": 5, "errorType": "stopped", "message": "stopped"}
        set_status(api_client, namespace, "stop1", failed)

    thread = threading.Thread(target=operator_sees_the_stop, daemon=True)
    thread.start()
    result = kapsis("stop", "stop1")
    thread.join(10)
    assert result.exit_code == 0, result.output
    assert "agent stop1: failed: stopped" in result.stderr
    # Gone (the emulator), or going (a real cluster: the 5 s grace period).
    left = [p for p in core.list_namespaced_pod(namespace).items if p.metadata.name == "stop1-pod"]
    assert all(p.metadata.deletion_timestamp for p in left)
    record = StatusStore().read("stop1")
    assert record is not None and (record.exit_code, record.error_type) == (5, "stopped")
    assert get_request(api_client, namespace, "stop1") is not None  # stop is not delete


def test_cleanup_deletes_finished_requests_and_their_records(
    project: Path, api_client: Any, namespace: str, operator_plays: Callable[..., None]
) -> None:
    spec = project / "task.md"
    spec.write_text("# task\n")
    operator_plays(namespace, "done1", {"phase": "Complete", "exitCode": 0, "message": "ok"})
    assert kapsis(
        "run", str(project), "--backend", "k8s", "-n", namespace, "--agent-id", "done1",
        "--spec", str(spec),
    ).exit_code == 0  # fmt: skip
    config_map = client.CoreV1Api(api_client).read_namespaced_config_map("done1-task", namespace)
    owner = get_request(api_client, namespace, "done1")
    assert owner is not None
    assert [r.uid for r in config_map.metadata.owner_references] == [owner["metadata"]["uid"]]
    assert kapsis(
        "run", str(project), "--backend", "k8s", "-n", namespace, "--agent-id", "live1",
        "-t", "sleep 1000", "--detach",
    ).exit_code == 0  # fmt: skip

    preview = kapsis("cleanup", "--dry-run")
    assert preview.exit_code == 0, preview.output
    assert f"would remove done1 (complete): AgentRequest {namespace}/done1" in preview.stdout
    assert "live1" not in preview.stdout
    assert get_request(api_client, namespace, "done1") is not None

    assert kapsis("cleanup").exit_code == 0
    assert get_request(api_client, namespace, "done1") is None
    assert StatusStore().read("done1") is None
    assert get_request(api_client, namespace, "live1") is not None  # still running: kept

    assert kapsis("cleanup", "--agent", "live1").exit_code == 0
    assert get_request(api_client, namespace, "live1") is None
    assert StatusStore().all() == []

    assert kapsis(
        "run", str(project), "--backend", "k8s", "-n", namespace, "--agent-id", "live2",
        "-t", "sleep 1000", "--detach",
    ).exit_code == 0  # fmt: skip
    assert kapsis("cleanup", "--all").exit_code == 0
    assert get_request(api_client, namespace, "live2") is None
    assert StatusStore().all() == []


def test_a_missing_namespace_is_one_line_and_exit_2(project: Path, api_client: Any) -> None:
    result = kapsis(
        "run", str(project), "--backend", "k8s", "-n", "no-such-ns", "-t", "x", "--detach"
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "kapsis: error: namespace 'no-such-ns' does not exist on the cluster; create it, or "
        "pass --namespace (or set kubernetes.namespace)"
    ]
    assert StatusStore().all() == []


def test_an_unreachable_cluster_is_one_line_and_exit_3(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "dead", "http://127.0.0.1:9")))
    result = kapsis("run", str(project), "--backend", "k8s", "-t", "x")
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("kapsis: error: cannot reach the Kubernetes API at http://127.0.0.1:9")


def test_a_cluster_without_the_crd_is_one_line_and_exit_4(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, emulator_only: None
) -> None:
    (tmp_path / "bare").mkdir()
    bare = EmulatedCluster(tmp_path / "bare").start()  # a cluster the backend is not installed on
    try:
        assert bare.emulator is not None
        del bare.emulator.resources[AR_RESOURCE]
        monkeypatch.setenv("KUBECONFIG", str(bare.kubeconfig))
        result = kapsis("run", str(project), "--backend", "k8s", "-t", "x")
    finally:
        bare.stop()
    assert result.exit_code == 4, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "has no AgentRequest CRD" in line and "kubectl apply -f deploy/" in line


def test_a_local_only_key_is_refused_before_any_cluster_call(project: Path, namespace: str) -> None:
    (project / "agent-sandbox.yaml").write_text("environment:\n  passthrough: [GITHUB_TOKEN]\n")
    assert kapsis("trust", str(project)).exit_code == 0  # else it is refused as untrusted
    result = kapsis("run", str(project), "--backend", "k8s", "-n", namespace, "-t", "x")
    assert result.exit_code == 2
    assert "kubernetes.secrets.GITHUB_TOKEN" in result.stderr
    assert StatusStore().all() == []


def test_ctrl_c_while_following_leaves_the_request_running(
    project: Path, api_client: Any, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kapsis.backends import kubernetes

    def interrupted(*_: Any, **__: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(kubernetes, "follow", interrupted)
    result = kapsis(
        "run", str(project), "--backend", "k8s", "-n", namespace, "--agent-id", "int1",
        "-t", "sleep 1000",
    )  # fmt: skip
    assert result.exit_code == 130
    assert "keeps running on the cluster" in result.stderr and "kapsis stop int1" in result.stderr
    assert get_request(api_client, namespace, "int1") is not None
    record = StatusStore().read("int1")
    assert record is not None and not record.finished


def test_a_request_deleted_while_followed_ends_the_run_as_killed(
    project: Path, api_client: Any, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kapsis.backends import k8s_client

    # A deletion between two watches is only seen when the next one starts (a real API server
    # replays it from the resourceVersion; the emulator does not): short watches keep it quick.
    monkeypatch.setattr(k8s_client, "WATCH_SECONDS", 1)
    monkeypatch.setattr(k8s_client, "WATCH_GRACE_SECONDS", 1)

    def delete_it() -> None:
        wait_for("the request", lambda: get_request(api_client, namespace, "del1"))
        custom(api_client).delete_namespaced_custom_object(
            ar.GROUP, ar.VERSION, namespace, ar.PLURAL, "del1"
        )

    thread = threading.Thread(target=delete_it, daemon=True)
    thread.start()
    result = kapsis(
        "run", str(project), "--backend", "k8s", "-n", namespace, "--agent-id", "del1", "-t", "x"
    )
    thread.join(10)
    assert result.exit_code == 5, result.output
    assert "was deleted while it ran" in result.stderr


def test_the_sdk_runs_on_the_cluster_with_the_same_request(
    project: Path, namespace: str, operator_plays: Callable[..., None]
) -> None:
    from kapsis import api
    from kapsis.sandbox.plan import RunRequest

    operator_plays(namespace, "sdk1", {"phase": "Failed", "exitCode": 6, "errorType": "timeout"})
    seen_phases: list[str] = []
    request = RunRequest(
        project=project, task="x", agent_id="sdk1", backend="k8s", namespace=namespace
    )
    result = api.run(request, on_status=lambda s: seen_phases.append(s.phase))
    assert (result.exit_code, result.error_type) == (6, "timeout")
    assert seen_phases[-1] == "Failed"
    assert api.status("sdk1")[0].backend == "k8s"


def test_the_namespace_comes_from_flag_config_context_then_default(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def namespace_of(*extra: str) -> str:
        result = kapsis("run", str(project), "--backend", "k8s", "-t", "x", "--dry-run", *extra)
        assert result.exit_code == 0, result.output
        return str(yaml.safe_load(result.stdout)["metadata"]["namespace"])

    kubeconfig = write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:9")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert namespace_of() == "default"
    data = yaml.safe_load(kubeconfig.read_text())
    data["contexts"][0]["context"]["namespace"] = "from-context"
    kubeconfig.write_text(yaml.safe_dump(data))
    assert namespace_of() == "from-context"
    (project / "agent-sandbox.yaml").write_text("kubernetes:\n  namespace: from-config\n")
    # The project's own file picks where the user's credentials reach only once trusted.
    assert kapsis("run", str(project), "--backend", "k8s", "-t", "x", "--dry-run").exit_code == 2
    assert kapsis("trust", str(project)).exit_code == 0
    assert namespace_of() == "from-config"
    assert namespace_of("-n", "from-flag") == "from-flag"


def test_no_kubeconfig_or_an_unknown_context_is_exit_2(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    result = kapsis("run", str(project), "--backend", "k8s", "-t", "x")
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("kapsis: error: cannot load the kubeconfig") and "KUBECONFIG" in line
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:9")))
    (project / "agent-sandbox.yaml").write_text("kubernetes:\n  context: nope\n")
    untrusted = kapsis("run", str(project), "--backend", "k8s", "-t", "x")
    assert untrusted.exit_code == 2 and "kubernetes.context" in untrusted.stderr
    assert kapsis("trust", str(project)).exit_code == 0
    result = kapsis("run", str(project), "--backend", "k8s", "-t", "x")
    assert result.exit_code == 2, result.output
    assert "context 'nope'" in result.stderr


def test_a_cluster_that_never_answers_costs_seconds_not_minutes(
    project: Path, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket
    import time

    from kapsis.backends import k8s_client

    assert kapsis(
        "run", str(project), "--backend", "k8s", "-n", namespace, "--agent-id", "mute1",
        "-t", "sleep 1000", "--detach",
    ).exit_code == 0  # fmt: skip
    silent = socket.socket()  # accepts connections (the backlog) and never says a word
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        port = silent.getsockname()[1]
        kubeconfig = write_kubeconfig(tmp_path / "mute", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setattr(k8s_client, "REQUEST_TIMEOUT", (1, 1))
        started = time.monotonic()
        result = kapsis("status", "mute1", "--json")
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["message"].startswith("cluster unreachable: ")
    assert elapsed < 10
