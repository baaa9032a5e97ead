"""The operator's settings: environment parsing, image prefixes, the open-network label."""

from __future__ import annotations

from pathlib import Path

import pytest

from kapsis.errors import ConfigError
from kapsis.k8s.names import ALLOW_OPEN_NETWORK_LABEL
from kapsis.k8s.settings import OperatorSettings, cluster_resolvers


def test_defaults_without_environment(tmp_path: Path) -> None:
    settings = OperatorSettings.from_env({}, resolv_conf=tmp_path / "missing")
    assert settings.agent_image == "localhost/kapsis-base:latest"
    assert settings.gateway_image == "localhost/kapsis-gateway:latest"
    assert settings.tools_image == "localhost/kapsis-operator:latest"
    assert settings.seccomp == "RuntimeDefault"
    assert settings.dns_servers == ()


def test_environment_overrides_and_lists(tmp_path: Path) -> None:
    settings = OperatorSettings.from_env(
        {
            "KAPSIS_OPERATOR_ALLOWED_IMAGE_PREFIXES": "registry.example/kapsis-, localhost/",
            "KAPSIS_OPERATOR_DNS_SERVERS": "10.96.0.10",
            "KAPSIS_OPERATOR_SECCOMP": "Localhost",
            "KAPSIS_OPERATOR_DATA_DIR": "/data",
            "UNRELATED": "x",
        },
        resolv_conf=tmp_path / "missing",
    )
    assert settings.allowed_image_prefixes == ("registry.example/kapsis-", "localhost/")
    assert settings.dns_servers == ("10.96.0.10",)
    assert settings.seccomp == "Localhost"
    assert settings.data_dir == Path("/data")


def test_unknown_or_bad_setting_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="KAPSIS_OPERATOR_SECOMP: unknown"):
        OperatorSettings.from_env({"KAPSIS_OPERATOR_SECOMP": "x"}, resolv_conf=tmp_path)
    with pytest.raises(ConfigError, match="KAPSIS_OPERATOR_SECCOMP"):
        OperatorSettings.from_env({"KAPSIS_OPERATOR_SECCOMP": "Unconfined"}, resolv_conf=tmp_path)


def test_dns_defaults_to_the_cluster_resolver(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(
        "search default.svc.cluster.local\nnameserver 10.96.0.10\nnameserver 127.0.0.53\n"
    )
    assert cluster_resolvers(resolv) == ["10.96.0.10"]
    assert OperatorSettings.from_env({}, resolv_conf=resolv).dns_servers == ("10.96.0.10",)


def test_image_prefixes() -> None:
    settings = OperatorSettings(allowed_image_prefixes=("localhost/kapsis-",))
    assert settings.image_allowed("localhost/kapsis-agent-claude:latest")
    assert not settings.image_allowed("docker.io/library/alpine")
    assert not OperatorSettings(allowed_image_prefixes=()).image_allowed("localhost/kapsis-x")


def test_open_network_needs_the_namespace_label() -> None:
    settings = OperatorSettings()
    assert settings.namespace_allows_open({ALLOW_OPEN_NETWORK_LABEL: "true"})
    assert not settings.namespace_allows_open({ALLOW_OPEN_NETWORK_LABEL: "yes"})
    assert not settings.namespace_allows_open({})
    assert not settings.namespace_allows_open(None)
