"""Shared fixtures for the unit tests: no real ~/.kapsis, ~/.config/kapsis or ./agent-sandbox.yaml.

Every test runs with KAPSIS_HOME and KAPSIS_CONFIG_DIR pointing into its own tmp_path and with an
empty directory as the working directory, so only the files a test writes can influence it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kapsis.agents import find_profile
from kapsis.config.loader import load_config
from kapsis.host.facts import HostFacts
from kapsis.sandbox.plan import RunRequest, SandboxPlan, build_plan

ROOTFUL_V1 = HostFacts(
    rootless=False, cgroup_version=1, apparmor=False, dns_servers=("192.0.2.53",)
)


@pytest.fixture(autouse=True)
def isolated_kapsis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "kapsis-home"
    config = tmp_path / "kapsis-config"
    cwd = tmp_path / "cwd"
    for directory in (home, config, cwd):
        directory.mkdir()
    monkeypatch.setenv("KAPSIS_HOME", str(home))
    monkeypatch.setenv("KAPSIS_CONFIG_DIR", str(config))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.chdir(cwd)


@pytest.fixture
def kapsis_home(isolated_kapsis: None, tmp_path: Path) -> Path:
    return tmp_path / "kapsis-home"


@pytest.fixture
def config_dir(isolated_kapsis: None, tmp_path: Path) -> Path:
    return tmp_path / "kapsis-config"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small project folder with a couple of files and no config of its own."""
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "README.md").write_text("# demo\n")
    (root / "src" / "main.py").write_text("print('hello')\n")
    return root


PlanFactory = Callable[..., SandboxPlan]


@pytest.fixture
def make_plan(project: Path, tmp_path: Path) -> PlanFactory:
    """Build a plan for ``project`` as ``kapsis run`` would, with a fake host and environment.

    ``config`` is the text of a --config file; other keyword arguments go to RunRequest.
    """
    counter = iter(range(1_000_000))

    def factory(
        *,
        config: str | None = None,
        host: HostFacts = ROOTFUL_V1,
        environ: dict[str, str] | None = None,
        task: str | None = "echo hello",
        agent_id: str | None = "unit1",
        **request_fields: Any,
    ) -> SandboxPlan:
        config_file = None
        if config is not None:
            config_file = tmp_path / f"run-config-{next(counter)}.yaml"
            config_file.write_text(config)
        request = RunRequest(
            project=project,
            task=task,
            agent_id=agent_id,
            config_file=config_file,
            **request_fields,
        )
        loaded = load_config(project, config_file, request.flag_values())
        profile = find_profile(loaded.config.agent.name)
        return build_plan(
            request, loaded, profile, host, environ={} if environ is None else environ
        )

    return factory
