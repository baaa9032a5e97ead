"""deploy/: every manifest validates for the stated Kubernetes version; RBAC is least privilege."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from ruamel.yaml import YAML

from kapsis.k8s.node_profiles import main as node_profiles
from kapsis.k8s.settings import DEFAULT_APPARMOR_PROFILE, KUBERNETES_VERSION

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for document in YAML(typ="safe").load_all(path.read_text(encoding="utf-8")):
            if document:
                documents.append((f"{path.name}:{document['kind']}", document))
    return documents


def _kind(kind: str) -> dict[str, Any]:
    return next(doc for _, doc in _documents() if doc["kind"] == kind)


@pytest.mark.parametrize(("where", "document"), _documents(), ids=[w for w, _ in _documents()])
def test_manifest_validates(where: str, document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_deploy_has_the_whole_installation() -> None:
    kinds = sorted(doc["kind"] for _, doc in _documents())
    assert kinds == sorted(
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "Deployment",
            "Namespace",
            "PersistentVolumeClaim",
            "ServiceAccount",
        ]
    )


def test_rbac_is_least_privilege() -> None:
    rules = _kind("ClusterRole")["rules"]
    granted = {
        (group, resource): set(rule["verbs"])
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    for (group, resource), verbs in granted.items():
        assert "*" not in verbs and resource != "*" and group != "*", (group, resource)
        assert not verbs & {"escalate", "bind", "impersonate"}
    assert ("", "secrets") not in granted  # the operator never reads a Secret
    assert ("", "pods/exec") not in granted
    assert granted[("", "pods")] == {"get", "list", "watch", "create", "patch", "delete"}
    assert granted[("kapsis.dev", "agentrequests/status")] == {"get", "patch"}
    assert granted[("", "namespaces")] == {"get", "list", "watch"}
    assert granted[("", "events")] == {"create"}
    binding = _kind("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == "kapsis-operator"  # not cluster-admin
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kapsis-operator", "namespace": "kapsis-system"}
    ]


def test_operator_deployment_is_locked_down() -> None:
    pod = _kind("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["command"] == ["python3", "-m", "kapsis.operator"]
    context = container["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "kapsis-operator-data"


def test_node_profiles_print(capsys: pytest.CaptureFixture[str]) -> None:
    node_profiles(["seccomp"])
    profile = json.loads(capsys.readouterr().out)
    denied = {
        n
        for rule in profile["syscalls"]
        for n in rule["names"]
        if rule["action"] == "SCMP_ACT_ERRNO"
    }
    assert {"unshare", "mount", "ptrace", "bpf"} <= denied
    node_profiles(["apparmor"])
    assert f"profile {DEFAULT_APPARMOR_PROFILE} " in capsys.readouterr().out
