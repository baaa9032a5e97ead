"""The operator image's package set and the registry tags (no podman needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kapsis.errors import ConfigError
from kapsis.host.operator_image import dependency_closure, prepare_site, registry_name


def test_closure_holds_the_operator_libraries_and_kapsis_dependencies() -> None:
    closure = dependency_closure()
    assert {"kopf", "kubernetes", "pydantic", "ruamel-yaml", "cryptography"} <= set(closure)
    assert "pytest" not in closure and "kmock" not in closure  # dev extras stay out


def test_site_has_this_kapsis_with_its_k8s_package(tmp_path: Path) -> None:
    prepare_site(tmp_path)
    assert (tmp_path / "kapsis" / "k8s" / "inpod" / "finish.py").is_file()
    assert (tmp_path / "kapsis" / "host" / "Containerfile.operator").is_file()
    assert (tmp_path / "kopf" / "__init__.py").is_file()
    assert not list((tmp_path / "kapsis").rglob("__pycache__"))


def test_registry_names() -> None:
    assert registry_name("localhost/kapsis-operator:latest", "reg.example:5000/team/") == (
        "reg.example:5000/team/kapsis-operator:latest"
    )
    assert registry_name("localhost/kapsis-agent-claude:latest", "reg.example") == (
        "reg.example/kapsis-agent-claude:latest"
    )
    with pytest.raises(ConfigError, match="--registry"):
        registry_name("localhost/kapsis-base:latest", "https://reg.example")
