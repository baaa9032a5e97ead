"""Agent images without podman: names, the --agents list, podman build args, image inspection,
which image a run picks, and `kapsis setup --agents` deciding what to build."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kapsis.agents import find_profile, list_profiles
from kapsis.cli.app import app
from kapsis.config.models import DEFAULT_IMAGE
from kapsis.errors import ConfigError, HostUnsupportedError
from kapsis.host import agent_images, image
from kapsis.host.agent_images import (
    AGENT_PROGRAMS,
    agent_image,
    host_ca_bundle,
    inspect_images,
    parse_agents,
)

# ---------------------------------------------------------------------------------------------
# names and the --agents list


def test_each_builtin_agent_profile_runs_in_its_agent_image() -> None:
    for agent in AGENT_PROGRAMS:
        profile = find_profile(agent)
        assert profile.image == agent_image(agent) == f"localhost/kapsis-agent-{agent}:latest"
        assert profile.requires == [AGENT_PROGRAMS[agent]]
    assert find_profile("shell").image is None


def test_agents_list_is_split_deduplicated_and_checked() -> None:
    assert parse_agents("claude, codex,claude,,aider") == ["claude", "codex", "aider"]
    with pytest.raises(ConfigError, match=r"unknown agent cursor; pick from claude,codex"):
        parse_agents("claude,cursor")
    with pytest.raises(ConfigError, match="empty"):
        parse_agents(" , ")


def test_the_ca_bundle_is_the_hosts_or_the_named_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "certs" / "bundle.pem"
    bundle.parent.mkdir()
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    link = tmp_path / "link.pem"
    link.symlink_to(bundle)
    monkeypatch.setenv("KAPSIS_CA_BUNDLE", str(link))
    assert host_ca_bundle() == bundle  # resolved: its own directory is what gets mounted
    monkeypatch.setenv("KAPSIS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(HostUnsupportedError, match="KAPSIS_CA_BUNDLE"):
        host_ca_bundle()


# ---------------------------------------------------------------------------------------------
# the build: one podman_build helper, two builds, the version read in between


def test_building_an_agent_image_builds_labels_and_untags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    contexts: list[dict[str, str]] = []

    def fake_run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(list(args))
        stdout = ""
        if args[1] == "build":
            context = Path(args[-1])
            contexts.append({p.name: oct(p.stat().st_mode & 0o777) for p in context.iterdir()})
        if args[1:3] == ["image", "inspect"]:
            built = len([c for c in calls if c[1] == "build"])
            stdout = {1: "sha256:staging\n", 2: "sha256:new\n"}.get(built, "")
        if args[1] == "run":
            stdout = "2.1.332 (Claude Code)\n"
        return subprocess.CompletedProcess(args, 0, stdout, "")

    bundle = tmp_path / "ca.crt"
    bundle.write_text("pem")
    monkeypatch.setenv("KAPSIS_CA_BUNDLE", str(bundle))
    monkeypatch.setattr(agent_images, "require_podman", lambda: "podman")
    monkeypatch.setattr(agent_images, "image_present", lambda name: True)
    monkeypatch.setattr(subprocess, "run", fake_run)

    assert agent_images.build_agent_image("claude") == "2.1.332"

    builds = [c for c in calls if c[1] == "build"]
    first, second = builds
    assert "--target=claude" in first and "--layers=false" in first and "--no-cache" in first
    assert first[first.index("-v") + 1] == f"{tmp_path}:/hostcerts:ro"
    assert "CA_BUNDLE=/hostcerts/ca.crt" in first
    assert "--network=none" not in first  # the install steps fetch from the registries
    assert first[first.index("-t") + 1] == "localhost/kapsis-agent-claude:building"
    assert contexts[0] == {
        "Containerfile.agents": "0o644",
        "npm_fetch.py": "0o644",
        "report_hook.py": "0o644",
        "claude-managed-settings.json": "0o644",
        "gemini-system-settings.json": "0o644",
        "codex-managed-config.toml": "0o644",
    }
    run = next(c for c in calls if c[1] == "run")
    assert run[-3:] == ["localhost/kapsis-agent-claude:building", "claude", "--version"]
    assert "--network=none" in run and "--user=1000:1000" in run
    assert "--label" in second and "io.kapsis.agent.version=2.1.332" in second
    assert f"io.kapsis.agent.recipe={agent_images.recipe_digest()}" in second
    assert "BASE=localhost/kapsis-agent-claude:building" in second
    assert second[second.index("-t") + 1] == "localhost/kapsis-agent-claude:latest"
    untag = next(c for c in calls if c[1] == "untag")
    assert untag[2:] == ["localhost/kapsis-agent-claude:building"] * 2
    # The staging image itself goes too, by its id, after the untag.
    assert calls[calls.index(untag) + 1][1:] == ["rmi", "sha256:staging"]


def test_base_and_gateway_builds_keep_their_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kapsis setup` without --agents builds exactly as before: no new podman flags."""
    seen: list[list[str]] = []
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda args, **kw: seen.append(list(args)) or subprocess.CompletedProcess(args, 0, "", ""),
    )
    image.podman_build(
        "podman", "x:1", recipe="Containerfile.gateway", base="b:1", log=Path("/nonexistent"),
        say=lambda line: None, network=True,
    )  # fmt: skip
    version = f"KAPSIS_VERSION={image.kapsis_version()}"
    assert seen[0][:9] == [
        "podman", "build", "--pull=never", "--build-arg", "BASE=b:1", "--build-arg", version,
        "-t", "x:1",
    ]  # fmt: skip
    assert seen[0][9] == "-f" and len(seen[0]) == 12


def test_a_version_that_cannot_be_read_fails_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda args, **kw: subprocess.CompletedProcess(args, 127, "", "codex: not found\n"),
    )
    with pytest.raises(Exception, match=r"codex --version failed in the new image .*not found"):
        agent_images.cli_version("podman", "img", "codex")


# ---------------------------------------------------------------------------------------------
# what podman has: one inspect call for all


def test_inspect_images_reads_presence_and_labels_from_one_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = [
        {
            "Id": "abc",
            "RepoTags": ["localhost/kapsis-agent-claude:latest"],
            "Config": {"Labels": {"io.kapsis.agent": "claude", "io.kapsis.agent.version": "2.1"}},
        },
        {"Id": "def", "RepoTags": [DEFAULT_IMAGE], "Config": {"Labels": None}},
    ]
    calls: list[list[str]] = []

    def fake_run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        # podman exits 125 when one is missing, but still prints the others.
        return subprocess.CompletedProcess(args, 125, json.dumps(found), "Error: image not known")

    monkeypatch.setattr(agent_images.shutil, "which", lambda name: "/usr/bin/podman")
    monkeypatch.setattr(subprocess, "run", fake_run)
    names = [agent_image("claude"), agent_image("codex"), DEFAULT_IMAGE, DEFAULT_IMAGE]
    infos = inspect_images(names)
    assert len(calls) == 1 and calls[0][3:] == names[:3]
    assert infos[agent_image("claude")].present and infos[agent_image("claude")].version == "2.1"
    assert not infos[agent_image("codex")].present
    assert infos[DEFAULT_IMAGE].present and infos[DEFAULT_IMAGE].version is None


def test_agents_list_shows_each_profiles_image_and_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fake_inspect(names: Any) -> dict[str, agent_images.ImageInfo]:
        infos = {n: agent_images.ImageInfo(n, False) for n in names}
        infos[agent_image("claude")] = agent_images.ImageInfo(
            agent_image("claude"), True, "claude", "2.1.332"
        )
        return infos

    monkeypatch.setattr(agent_images, "inspect_images", fake_inspect)
    result = CliRunner().invoke(app, ["agents", "list", "--json"])
    assert result.exit_code == 0, result.output
    listing = {entry["name"]: entry for entry in json.loads(result.stdout)}
    assert listing["claude"]["image_present"] and listing["claude"]["cli_version"] == "2.1.332"
    assert listing["codex"]["runs_in"] == agent_image("codex")
    assert not listing["codex"]["image_present"] and listing["codex"]["cli_version"] is None
    assert listing["shell"]["runs_in"] == DEFAULT_IMAGE
    table = CliRunner().invoke(app, ["agents", "list"], env={"COLUMNS": "200"})
    assert "kapsis-agent-claude present" in table.stdout and "2.1.332" in table.stdout
    assert "kapsis-agent-codex missing" in table.stdout
    assert len(list_profiles()) == len(listing)


# ---------------------------------------------------------------------------------------------
# which image a run uses


def test_the_profiles_image_is_used_unless_one_is_given(make_plan: Any, tmp_path: Path) -> None:
    keys = {"ANTHROPIC_API_KEY": "sk-unit"}
    assert make_plan(agent="claude", environ=keys).image == agent_image("claude")
    assert make_plan(agent="shell").image == DEFAULT_IMAGE
    assert make_plan(agent="claude", image="my/image:1", environ=keys).image == "my/image:1"
    config = "image:\n  name: cfg/image:2\n"
    assert make_plan(agent="claude", config=config, environ=keys).image == "cfg/image:2"
    # Named explicitly, even the default wins over the profile's.
    config = f"image:\n  name: {DEFAULT_IMAGE}\n"
    assert make_plan(agent="claude", config=config, environ=keys).image == DEFAULT_IMAGE


# ---------------------------------------------------------------------------------------------
# kapsis setup --agents


@pytest.fixture
def setup_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`kapsis setup` with every build and check replaced by a recorder."""
    calls: dict[str, Any] = {"base": 0, "gateway": 0, "agents": [], "present": set()}
    from kapsis.host import checks, gateway_image

    monkeypatch.setattr(image, "image_present", lambda name: name in calls["present"])
    monkeypatch.setattr(
        image, "build_base_image", lambda *a, **k: calls.__setitem__("base", calls["base"] + 1)
    )
    monkeypatch.setattr(
        gateway_image,
        "build_gateway_image",
        lambda *a, **k: calls.__setitem__("gateway", calls["gateway"] + 1),
    )
    monkeypatch.setattr(agent_images, "image_present", lambda name: name in calls["present"])
    monkeypatch.setattr(
        agent_images, "build_agent_image", lambda agent, **k: calls["agents"].append(agent)
    )
    monkeypatch.setattr(checks, "run_checks", lambda image: [])
    return calls


def test_setup_without_agents_builds_no_agent_image(setup_calls: dict[str, Any]) -> None:
    result = CliRunner().invoke(app, ["setup", "--build"])
    assert result.exit_code == 0, result.output
    assert (setup_calls["base"], setup_calls["gateway"], setup_calls["agents"]) == (1, 1, [])


def test_setup_agents_builds_the_missing_ones_and_build_rebuilds_all(
    setup_calls: dict[str, Any],
) -> None:
    from kapsis.sandbox.network_plan import DEFAULT_GATEWAY_IMAGE

    setup_calls["present"] = {DEFAULT_IMAGE, DEFAULT_GATEWAY_IMAGE, agent_image("claude")}
    assert CliRunner().invoke(app, ["setup", "--agents", "claude,codex"]).exit_code == 0
    assert (setup_calls["base"], setup_calls["agents"]) == (0, ["codex"])
    setup_calls["agents"].clear()
    assert CliRunner().invoke(app, ["setup", "--check", "--agents", "codex"]).exit_code == 0
    assert setup_calls["agents"] == []
    assert CliRunner().invoke(app, ["setup", "--build", "--agents", "claude,codex"]).exit_code == 0
    assert (setup_calls["base"], setup_calls["agents"]) == (1, ["claude", "codex"])
    bad = CliRunner().invoke(app, ["setup", "--agents", "claude,nope"])
    assert bad.exit_code == 2 and "unknown agent nope" in bad.stderr


def test_the_hint_for_a_missing_image_names_the_command_that_builds_it() -> None:
    assert agent_images.build_hint(agent_image("codex")) == (
        "build it with `kapsis setup --agents codex`"
    )
    assert agent_images.build_hint(DEFAULT_IMAGE) == "build it with `kapsis setup --build`"
    assert agent_images.build_hint("localhost/kapsis-agent-x:1").endswith("--build`")


def test_the_recipe_digest_changes_with_any_file_the_images_copy_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An image built before its hooks' settings changed is told apart by its label."""
    before = agent_images.recipe_digest()
    monkeypatch.setattr(agent_images, "CONTEXT_FILES", agent_images.CONTEXT_FILES[:-1])
    assert agent_images.recipe_digest() != before
