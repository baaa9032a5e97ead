"""The operator's admission rules: each rejection next to the control that passes."""

from __future__ import annotations

from typing import Any

import pytest

from kapsis.errors import ExitCode
from kapsis.k8s.settings import OperatorSettings
from kapsis.operator.validation import RequestRejected, agent_image, validate_request

SETTINGS = OperatorSettings(allowed_image_prefixes=("localhost/kapsis-", "registry.example/team/"))
OPEN_NS = {"kapsis.dev/allow-open-network": "true"}


def spec(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "task": {"inline": "make test"},
        "workspace": {"git": {"url": "https://git.example/app.git"}},
    }
    base.update(changes)
    return base


def rejected(raw: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    with pytest.raises(RequestRejected) as error:
        validate_request(raw, labels or {}, SETTINGS)
    assert error.value.exit_code == ExitCode.USAGE
    assert error.value.error_type == "config"
    return str(error.value)


def test_a_plain_request_passes():
    parsed = validate_request(spec(), {}, SETTINGS)
    assert parsed.network.mode == "filtered"


def test_open_network_needs_the_namespace_label():
    reason = rejected(spec(network={"mode": "open"}))
    assert "open" in reason and "kapsis.dev/allow-open-network=true" in reason
    assert "open" in rejected(
        spec(network={"mode": "open"}), {"kapsis.dev/allow-open-network": "yes"}
    )
    # Control: the labelled namespace allows it.
    assert (
        validate_request(spec(network={"mode": "open"}), OPEN_NS, SETTINGS).network.mode == "open"
    )


def test_the_open_network_label_is_the_settings_one():
    settings = OperatorSettings(open_network_label="example.org/open")
    with pytest.raises(RequestRejected):
        validate_request(spec(network={"mode": "open"}), OPEN_NS, settings)
    validate_request(spec(network={"mode": "open"}), {"example.org/open": "true"}, settings)


@pytest.mark.parametrize(
    "environment",
    [
        {"set": {"KAPSIS_TASK": "x"}},
        {"set": {"HOME": "/root"}},
        {"secrets": {"KAPSIS_TOKEN": {"name": "s", "key": "k"}}},
        {"secrets": {"HOME": {"name": "s", "key": "k"}}},
    ],
)
def test_reserved_environment_names_are_rejected(environment: dict[str, Any]):
    assert "reserved" in rejected(spec(environment=environment))


def test_ordinary_environment_names_pass():
    environment = {"set": {"CI": "1"}, "secrets": {"API_TOKEN": {"name": "tok", "key": "value"}}}
    validate_request(spec(environment=environment), {}, SETTINGS)


def test_disallowed_images_are_rejected():
    reason = rejected(spec(agent={"image": "docker.io/library/python:3"}))
    assert "docker.io/library/python:3" in reason and "localhost/kapsis-" in reason
    # A prefix must match from the start, not anywhere.
    rejected(spec(agent={"image": "evil.example/localhost/kapsis-base"}))
    # Control: allowed prefixes pass.
    validate_request(spec(agent={"image": "registry.example/team/agent:1"}), {}, SETTINGS)
    validate_request(spec(agent={"image": "localhost/kapsis-base:latest"}), {}, SETTINGS)


def test_the_profile_image_is_checked_too():
    parsed = validate_request(spec(), {}, SETTINGS)
    assert agent_image(parsed, SETTINGS).startswith("localhost/kapsis-")
    strict = OperatorSettings(allowed_image_prefixes=("registry.example/",))
    with pytest.raises(RequestRejected, match="not allowed"):
        validate_request(spec(), {}, strict)
    assert "profile" in rejected(spec(agent={"profile": "no-such-agent"}))


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"task": {"configMapRef": {"name": "Bad_Name"}}}, "configMapRef.name"),
        ({"task": {"configMapRef": {"name": "ok", "key": "a/b"}}}, "configMapRef.key"),
        ({"workspace": {"git": {"url": "https://x/y", "credentialsSecret": "UPPER"}}},
         "credentialsSecret"),
        ({"environment": {"secrets": {"TOKEN": {"name": "-bad", "key": "k"}}}}, "TOKEN.name"),
        ({"environment": {"secrets": {"TOKEN": {"name": "ok", "key": "sp ace"}}}}, "TOKEN.key"),
    ],
)  # fmt: skip
def test_malformed_references_are_rejected(changes: dict[str, Any], where: str):
    assert where in rejected(spec(**changes))


def test_well_formed_references_pass():
    validate_request(
        spec(
            task={"configMapRef": {"name": "task-spec.v1", "key": "task.md"}},
            workspace={"git": {"url": "https://x/y", "credentialsSecret": "git-creds"}},
        ),
        {},
        SETTINGS,
    )


def test_a_spec_the_models_refuse_is_rejected_with_its_field():
    assert "spec.task" in rejected({"workspace": {"git": {"url": "https://x/y"}}})
    assert "unknownField" in rejected(spec(unknownField=1))
