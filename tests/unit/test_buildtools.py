"""Build-tool policies: the rendered settings files, the plan's mounts and environment, the
allowlist entries, and the real tools (Maven, npm, pip) reading the files where installed."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from kapsis.backends.podman import agent_run_args
from kapsis.buildtools import (
    MAVEN_CENTRAL,
    MAVEN_SETTINGS_TARGET,
    NPMRC_TARGET,
    PIP_CONF_TARGET,
    maven_settings,
    npmrc,
    pip_conf,
    write_files,
)
from kapsis.config.models import KapsisConfig, MavenSection
from kapsis.errors import ConfigError

NS = {"s": "http://maven.apache.org/SETTINGS/1.2.0"}
MIRROR = "https://nexus.corp.example/repository/maven-public/"
FULL = f"""
build_tools:
  maven: {{mirror_url: "{MIRROR}", block_snapshots: true}}
  npm: {{registry: "https://npm.corp.example/"}}
  pip: {{index_url: "http://203.0.113.9:8080/simple", trusted_host: true}}
"""


def mirrors(xml: str) -> list[dict[str, str]]:
    root = ET.fromstring(xml.split("\n", 2)[2])
    return [
        {child.tag.split("}")[1]: child.text or "" for child in mirror}
        for mirror in root.findall("s:mirrors/s:mirror", NS)
    ]


def test_a_mirror_alone_serves_every_remote_repository():
    xml = maven_settings(MavenSection(mirror_url=MIRROR))
    assert mirrors(xml) == [
        {"id": "kapsis-mirror", "name": "build_tools.maven.mirror_url", "url": MIRROR,
         "mirrorOf": "external:*"}
    ]  # fmt: skip
    assert ET.fromstring(xml.split("\n", 2)[2]).find("s:profiles", NS) is None


def test_block_snapshots_leaves_central_releases_only_and_blocks_the_rest():
    xml = maven_settings(MavenSection(block_snapshots=True))
    root = ET.fromstring(xml.split("\n", 2)[2])

    (blocked,) = mirrors(xml)
    assert blocked["mirrorOf"] == "external:*,!central" and blocked["blocked"] == "true"
    assert root.findtext("s:activeProfiles/s:activeProfile", namespaces=NS) == (
        "kapsis-releases-only"
    )
    for path in ("s:repositories/s:repository", "s:pluginRepositories/s:pluginRepository"):
        repository = root.find(f"s:profiles/s:profile/{path}", NS)
        assert repository is not None
        assert repository.findtext("s:id", namespaces=NS) == "central"
        assert repository.findtext("s:url", namespaces=NS) == MAVEN_CENTRAL
        assert repository.findtext("s:snapshots/s:enabled", namespaces=NS) == "false"
        assert repository.findtext("s:releases/s:enabled", namespaces=NS) == "true"


def test_mirror_and_block_snapshots_route_central_through_the_mirror():
    xml = maven_settings(MavenSection(mirror_url=MIRROR, block_snapshots=True))
    found = {m["id"]: m for m in mirrors(xml)}
    assert found["kapsis-mirror"]["mirrorOf"] == "central"
    assert found["kapsis-blocked"]["mirrorOf"] == "external:*,!central"
    root = ET.fromstring(xml.split("\n", 2)[2])
    urls = {e.text for e in root.iterfind(".//s:repository/s:url", NS)}
    assert urls == {MIRROR}


def test_xml_special_characters_in_a_url_are_escaped():
    url = "https://m.example/r?a=1&b=<2>"
    xml = maven_settings(MavenSection(mirror_url=url))
    assert mirrors(xml)[0]["url"] == url


def test_npmrc_and_pip_conf_read_back():
    assert npmrc("https://npm.corp.example/").splitlines()[1] == (
        "registry=https://npm.corp.example/"
    )
    parser = configparser.ConfigParser()
    parser.read_string(pip_conf("https://pypi.corp.example/simple", "pypi.corp.example"))
    assert parser["global"]["index-url"] == "https://pypi.corp.example/simple"
    assert parser["global"]["trusted-host"] == "pypi.corp.example"
    parser = configparser.ConfigParser()
    parser.read_string(pip_conf("https://pypi.corp.example/simple", None))
    assert "trusted-host" not in parser["global"]


def test_nothing_is_added_without_build_tools(make_plan):
    plan = make_plan()
    assert plan.build_tools is None
    assert [t.target for t in plan.tmpfs] == ["/tmp", "/home/agent"]
    assert not {"PIP_INDEX_URL", "NPM_CONFIG_REGISTRY"} & set(plan.env)


def test_the_plan_mounts_each_file_read_only_with_its_environment(make_plan, kapsis_home):
    plan = make_plan(config=FULL)

    assert plan.build_tools is not None
    folder = kapsis_home / "sandboxes" / "unit1" / "build-tools"
    mounts = {m.target: (m.source, m.read_only) for m in plan.mounts}
    assert mounts[MAVEN_SETTINGS_TARGET] == (str(folder / "maven-settings.xml"), True)
    assert mounts[NPMRC_TARGET] == (str(folder / "npmrc"), True)
    assert mounts[PIP_CONF_TARGET] == (str(folder / "pip.conf"), True)
    assert plan.env["NPM_CONFIG_REGISTRY"] == "https://npm.corp.example/"
    assert plan.env["PIP_INDEX_URL"] == plan.env["UV_DEFAULT_INDEX"]
    assert plan.env["PIP_TRUSTED_HOST"] == "203.0.113.9:8080"
    # ~/.m2 is a tmpfs of the agent's own around the read-only file (its local repository).
    m2 = [t for t in plan.tmpfs if t.target == "/home/agent/.m2"]
    assert m2 and "U" in m2[0].options
    args = agent_run_args(plan, detach=False, uid_base=100000)
    assert f"{folder / 'pip.conf'}:{PIP_CONF_TARGET}:ro" in args
    tmpfs = [args[i + 1] for i, a in enumerate(args) if a == "--tmpfs"]
    assert tmpfs[-1].startswith("/home/agent/.m2:")


def test_an_explicit_environment_value_wins_over_the_tool_default(make_plan):
    config = FULL + "environment:\n  set:\n    PIP_INDEX_URL: https://other.example/simple\n"
    assert make_plan(config=config).env["PIP_INDEX_URL"] == "https://other.example/simple"


def test_the_mirror_hosts_join_the_allowlist_with_their_source(make_plan):
    rules = {rule.pattern: rule for rule in make_plan(config=FULL).network.policy.rules}

    assert rules["nexus.corp.example"].ports == (443,)
    assert rules["nexus.corp.example"].sources[0].startswith("build_tools.maven.mirror_url (")
    assert rules["npm.corp.example"].ports == (443,)
    assert rules["203.0.113.9/32"].kind == "address" and rules["203.0.113.9/32"].ports == (8080,)
    assert "run-config-0.yaml:5" in rules["203.0.113.9/32"].sources[0]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ftp://mirror.example/", "http"),
        ("https://user:pw@mirror.example/", "no credentials"),
        ("mirror.example", "http"),
        ("https://mirror.example:0/", "port"),
    ],
)
def test_bad_urls_are_config_errors(make_plan, value, message):
    with pytest.raises(ConfigError, match=message):
        make_plan(config=f"build_tools:\n  npm:\n    registry: '{value}'\n")


def test_every_build_tools_key_is_off_by_default():
    section = KapsisConfig().build_tools
    assert section.maven.mirror_url is None and section.maven.block_snapshots is False
    assert section.npm.registry is None and section.pip.index_url is None


# ---------------------------------------------------------------------------------------------
# the real tools, where the machine has them (offline: nothing is fetched)


@pytest.fixture
def rendered(make_plan) -> dict[str, Path]:
    plan = make_plan(config=FULL)
    assert plan.build_tools is not None
    write_files(plan.build_tools)
    return {item.tool: Path(item.source) for item in plan.build_tools.files}


@pytest.mark.skipif(shutil.which("mvn") is None, reason="needs Maven")
def test_maven_applies_the_mirror_and_blocks_a_snapshot_repository(rendered, tmp_path):
    project = tmp_path / "mvn"
    project.mkdir()
    (project / "pom.xml").write_text(
        '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
        "<groupId>t</groupId><artifactId>t</artifactId><version>1</version>"
        "<packaging>pom</packaging><repositories><repository><id>snaps</id>"
        "<url>https://snapshots.example.test/repo</url><snapshots><enabled>true</enabled>"
        "</snapshots></repository></repositories></project>"
    )
    result = subprocess.run(
        ["mvn", "-B", "-o", "-X", "-s", str(rendered["maven"]),
         f"-Dmaven.repo.local={tmp_path / 'repo'}", "validate"],
        cwd=project, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out[-3000:]
    assert "[WARNING]" not in out  # the settings parse cleanly
    assert f"Using mirror kapsis-mirror ({MIRROR}) for central" in out
    assert "Using mirror kapsis-blocked (http://0.0.0.0/) for snaps" in out
    assert f"kapsis-mirror ({MIRROR}, default, releases)" in out  # snapshots off
    assert "blocked)" in out


@pytest.mark.skipif(shutil.which("npm") is None, reason="needs npm")
def test_npm_reads_the_registry_from_the_file(rendered, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("npm_config_")}
    env["NPM_CONFIG_USERCONFIG"] = str(rendered["npm"])
    result = subprocess.run(
        ["npm", "config", "get", "registry"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert result.stdout.strip() == "https://npm.corp.example/"


def test_pip_reads_the_index_from_the_file(rendered, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = str(rendered["pip"])
    result = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "global.index-url='http://203.0.113.9:8080/simple'" in result.stdout
    assert "global.trusted-host='203.0.113.9:8080'" in result.stdout
