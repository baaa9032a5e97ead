"""Build-tool policies: Maven, npm and pip (and uv) pointed at approved sources.

For each tool the config sets, the plan carries the settings file Kapsis renders (Maven
``settings.xml``, ``.npmrc``, ``pip.conf``), the read-only mount that puts it where the tool
reads it, and the environment variables the tool honours ahead of any file
(``NPM_CONFIG_REGISTRY``, ``PIP_INDEX_URL``, ``UV_DEFAULT_INDEX``). The hosts of the URLs join
the filtered-mode allowlist (see :func:`allowlist_entries`), so the approved source is the one
the agent can reach.

What this guarantees: the files are the host's, and the agent cannot change them. What it does
not: a build the agent runs can still pass ``-s``, ``--registry`` or ``--index-url`` of its own.
The network allowlist is what stops it from reaching anything else.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from kapsis.config.base import AGENT_HOME
from kapsis.config.loader import LoadedConfig
from kapsis.config.models import BuildToolsSection, MavenSection
from kapsis.sandbox.plan_model import PlanModel

MAVEN_DIR = f"{AGENT_HOME}/.m2"
MAVEN_SETTINGS_TARGET = f"{MAVEN_DIR}/settings.xml"
NPMRC_TARGET = f"{AGENT_HOME}/.npmrc"
PIP_CONF_TARGET = "/etc/pip.conf"
MAVEN_CENTRAL = "https://repo.maven.apache.org/maven2"
SETTINGS_NS = "http://maven.apache.org/SETTINGS/1.2.0"
HEADER = "Written by Kapsis from build_tools in the config; read-only in the sandbox."


class ToolFile(PlanModel):
    """One settings file: rendered into the sandbox dir, mounted read-only at ``target``."""

    tool: str
    source: str
    target: str
    content: str


class BuildToolsPlan(PlanModel):
    files: tuple[ToolFile, ...]
    env: dict[str, str]
    # Writable directories (tmpfs, owned by the agent) that a settings file is mounted into.
    writable_dirs: tuple[str, ...] = ()


def plan_build_tools(loaded: LoadedConfig, sandbox_root: Path) -> BuildToolsPlan | None:
    section = loaded.config.build_tools
    folder = sandbox_root / "build-tools"
    files: list[ToolFile] = []
    env: dict[str, str] = {}
    dirs: list[str] = []
    maven = section.maven
    if maven.mirror_url or maven.block_snapshots:
        source = str(folder / "maven-settings.xml")
        files.append(
            ToolFile(
                tool="maven",
                source=source,
                target=MAVEN_SETTINGS_TARGET,
                content=maven_settings(maven),
            )
        )
        # ~/.m2 must stay the agent's (its local repository lives there) around the file.
        dirs.append(MAVEN_DIR)
    if section.npm.registry:
        registry = section.npm.registry
        files.append(
            ToolFile(
                tool="npm",
                source=str(folder / "npmrc"),
                target=NPMRC_TARGET,
                content=npmrc(registry),
            )
        )
        env["NPM_CONFIG_REGISTRY"] = registry
    pip = section.pip
    if pip.index_url:
        trusted = _netloc(pip.index_url) if pip.trusted_host else None
        files.append(
            ToolFile(
                tool="pip",
                source=str(folder / "pip.conf"),
                target=PIP_CONF_TARGET,
                content=pip_conf(pip.index_url, trusted),
            )
        )
        env["PIP_INDEX_URL"] = pip.index_url
        env["UV_DEFAULT_INDEX"] = pip.index_url
        if trusted:
            env["PIP_TRUSTED_HOST"] = trusted
            env["UV_INSECURE_HOST"] = trusted
    if not files:
        return None
    return BuildToolsPlan(files=tuple(files), env=env, writable_dirs=tuple(dirs))


def maven_settings(maven: MavenSection) -> str:
    """settings.xml: a mirror for every remote repository, or Central-only releases, or both.

    Maven picks a mirror whose mirrorOf names the repository id exactly before any pattern, so
    with ``block_snapshots`` the approved mirror (or Central itself) serves ``central`` and the
    blocked mirror catches every other remote repository.
    """
    from xml.etree import ElementTree as ET  # only for Maven settings: not on every run's path

    ET.register_namespace("", SETTINGS_NS)

    def sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
        element = ET.SubElement(parent, f"{{{SETTINGS_NS}}}{tag}")
        element.text = text
        return element

    root = ET.Element(f"{{{SETTINGS_NS}}}settings")
    mirrors = sub(root, "mirrors")
    if maven.mirror_url:
        mirror = sub(mirrors, "mirror")
        sub(mirror, "id", "kapsis-mirror")
        sub(mirror, "name", "build_tools.maven.mirror_url")
        sub(mirror, "url", maven.mirror_url)
        sub(mirror, "mirrorOf", "central" if maven.block_snapshots else "external:*")
    if maven.block_snapshots:
        blocked = sub(mirrors, "mirror")
        sub(blocked, "id", "kapsis-blocked")
        sub(
            blocked,
            "name",
            "remote repositories other than central (build_tools.maven.block_snapshots)",
        )
        sub(blocked, "url", "http://0.0.0.0/")
        sub(blocked, "mirrorOf", "external:*,!central")
        sub(blocked, "blocked", "true")
        profile = sub(sub(root, "profiles"), "profile")
        sub(profile, "id", "kapsis-releases-only")
        for group, item in (
            ("repositories", "repository"),
            ("pluginRepositories", "pluginRepository"),
        ):
            repository = sub(sub(profile, group), item)
            sub(repository, "id", "central")
            sub(repository, "url", maven.mirror_url or MAVEN_CENTRAL)
            sub(sub(repository, "releases"), "enabled", "true")
            sub(sub(repository, "snapshots"), "enabled", "false")
        sub(sub(root, "activeProfiles"), "activeProfile", "kapsis-releases-only")
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<!-- {HEADER} -->\n{body}\n'


def npmrc(registry: str) -> str:
    return f"; {HEADER}\nregistry={registry}\n"


def pip_conf(index_url: str, trusted_host: str | None) -> str:
    lines = [f"# {HEADER}", "[global]", f"index-url = {index_url}"]
    if trusted_host:
        lines.append(f"trusted-host = {trusted_host}")
    return "\n".join(lines) + "\n"


def write_files(plan: BuildToolsPlan) -> None:
    for item in plan.files:
        path = Path(item.source)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(item.content, encoding="utf-8")
        path.chmod(0o644)


def allowlist_entries(section: BuildToolsSection) -> list[tuple[str, str, bool]]:
    """(entry, config key, is_address) for the host of every configured URL, with its port."""
    import ipaddress

    urls = (
        ("build_tools.maven.mirror_url", section.maven.mirror_url),
        ("build_tools.npm.registry", section.npm.registry),
        ("build_tools.pip.index_url", section.pip.index_url),
    )
    entries = []
    for key, url in urls:
        if not url:
            continue
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            entries.append((f"{host}:{port}", key, False))
            continue
        shown = f"[{address}]" if address.version == 6 else str(address)
        entries.append((f"{shown}:{port}", key, True))
    return entries


def _netloc(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{host}:{parts.port}" if parts.port else host
