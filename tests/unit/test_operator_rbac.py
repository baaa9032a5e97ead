"""The operator's ClusterRole (deploy/operator.yaml) grants every verb the operator uses."""

from __future__ import annotations

from pathlib import Path

import yaml

from kapsis.operator.kube import API_VERBS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "operator.yaml"


def _granted() -> dict[tuple[str, str], set[str]]:
    documents = [d for d in yaml.safe_load_all(DEPLOY.read_text()) if d]
    [role] = [d for d in documents if d["kind"] == "ClusterRole"]
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_the_cluster_role_grants_what_the_operator_calls_need():
    granted = _granted()
    for key, verbs in API_VERBS.items():
        missing = verbs - granted.get(key, set())
        assert not missing, f"{key}: the ClusterRole lacks {sorted(missing)}"


def test_on_the_objects_only_its_own_code_touches_the_role_grants_nothing_more():
    # kopf itself also reads requests, namespaces and CRDs; Pods, ConfigMaps and
    # NetworkPolicies are the operator's own calls alone.
    granted = _granted()
    for key in (("", "pods"), ("", "configmaps"), ("networking.k8s.io", "networkpolicies")):
        assert granted[key] == API_VERBS[key], key
    assert ("", "pods/status") not in granted
