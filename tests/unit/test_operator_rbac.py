"""The operator's ClusterRole (deploy/operator.yaml) grants every verb the operator uses."""

from __future__ import annotations

from pathlib import Path

import yaml

from kapsis.operator.kube import API_VERBS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "operator.yaml"


def test_the_cluster_role_grants_what_the_operator_calls_need():
    documents = [d for d in yaml.safe_load_all(DEPLOY.read_text()) if d]
    [role] = [d for d in documents if d["kind"] == "ClusterRole"]
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    for key, verbs in API_VERBS.items():
        missing = verbs - granted.get(key, set())
        assert not missing, f"{key}: the ClusterRole lacks {sorted(missing)}"
