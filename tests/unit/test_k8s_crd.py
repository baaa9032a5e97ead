"""The AgentRequest CRD: generated from the models, structural, valid for the stated version."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from pydantic import BaseModel

from kapsis.errors import ConfigError
from kapsis.k8s.crd import crd, crd_yaml, structural_schema
from kapsis.k8s.resource import AgentRequestSpec, AgentRequestStatus
from kapsis.k8s.settings import KUBERNETES_VERSION

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "deploy" / "crd.yaml"


def _schema() -> dict[str, Any]:
    version = crd()["spec"]["versions"][0]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def _as_draft4(node: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI v3.0 schema in plain JSON Schema draft 4, to validate instances with."""
    out: dict[str, Any] = {k: v for k, v in node.items() if not k.startswith("x-kubernetes")}
    out.pop("nullable", None)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable"):
        out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "properties" in out:
        out["properties"] = {k: _as_draft4(v) for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _as_draft4(out[key])
    return out


def test_committed_crd_matches_the_generator() -> None:
    assert CRD_FILE.read_text(encoding="utf-8") == crd_yaml(), (
        "deploy/crd.yaml is out of date; run `python scripts/gen_docs.py`"
    )


def test_crd_validates_against_the_stated_kubernetes_version() -> None:
    kubernetes_validate.validate(crd(), KUBERNETES_VERSION, strict=True)


def test_schema_is_structural() -> None:
    nodes = list(_nodes(_schema()))
    assert len(nodes) > 50  # the walk reaches the nested sections
    for path, node in nodes:
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path}: no type"
        assert not {"$ref", "anyOf", "oneOf", "allOf", "$defs", "title"} & node.keys(), path
        if "properties" in node:
            assert "additionalProperties" not in node, path
        if "default" in node:
            # The API server requires a default to validate against its own node.
            jsonschema.Draft4Validator(_as_draft4(node)).validate(node["default"])


def test_names_columns_and_status_subresource() -> None:
    spec = crd()["spec"]
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["ar"]
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c]
    assert columns == ["Phase", "Progress", "Branch", "Age"]


def test_schema_keeps_enums_descriptions_and_shared_sections() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    mode = spec["network"]["properties"]["mode"]
    assert mode["enum"] == ["none", "open", "filtered"]
    assert "gateway" in mode["description"]
    assert spec["security"]["properties"]["profile"]["enum"] == [
        "minimal",
        "standard",
        "strict",
        "paranoid",
    ]
    secrets = spec["environment"]["properties"]["secrets"]
    assert secrets["additionalProperties"]["required"] == ["name", "key"]
    assert spec["resources"]["properties"]["timeout"]["x-kubernetes-int-or-string"] is True
    cpus = spec["resources"]["properties"]["cpus"]
    assert (cpus["minimum"], cpus["exclusiveMinimum"]) == (0, True)


def _request() -> dict[str, Any]:
    spec = AgentRequestSpec.model_validate(
        {
            "agent": {"profile": "claude"},
            "task": {"inline": "fix the tests"},
            "workspace": {"git": {"url": "https://git.example/r.git", "credentialsSecret": "c"}},
            "network": {"mode": "filtered", "allowlist": {"hosts": ["pypi.org"]}},
            "resources": {"timeout": "30m", "pids": 512},
            "environment": {"secrets": {"API_KEY": {"name": "s", "key": "k"}}},
        }
    )
    status = AgentRequestStatus(phase="Running", progress=40, pushStatus=None)
    return {
        "spec": spec.model_dump(mode="json", by_alias=True),
        "status": status.model_dump(mode="json"),
    }


def test_a_valid_request_passes_and_a_bad_one_fails_the_schema() -> None:
    validator = jsonschema.Draft4Validator(_as_draft4(_schema()))
    good = _request()
    validator.validate(good)
    bad = _request()
    bad["spec"]["network"]["mode"] = "wide-open"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)
    bad = _request()
    bad["spec"]["resources"]["cpus"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)


def test_unknown_union_is_refused_by_the_generator() -> None:
    class Odd(BaseModel):
        value: int | bool

    with pytest.raises(ConfigError, match="no structural form"):
        structural_schema(Odd)
