"""The ``ssh`` and ``build_tools`` sections: how the sandbox's own tools reach their hosts.

Re-exported by :mod:`kapsis.config.models`, which assembles every section into the config.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from kapsis.config.base import FREE, NEEDS_TRUST, SUBSET, Section, widest_first

GitProvider = Literal["github.com", "gitlab.com", "bitbucket.org"]
GIT_PROVIDERS: tuple[GitProvider, ...] = ("github.com", "gitlab.com", "bitbucket.org")


def _check_known_hosts_line(value: str) -> str:
    from kapsis.ssh.keys import parse_known_hosts_line

    parse_known_hosts_line(value, "config")
    return " ".join(value.split()[:3])


def _check_url(value: str) -> str:
    from urllib.parse import urlsplit

    text = value.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"{value!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http(s) URL, e.g. https://mirror.example/maven2")
    if parts.username or parts.password:
        raise ValueError(
            f"{parts.hostname}: no credentials in the URL; the agent can read these settings"
        )
    if port == 0:
        raise ValueError(f"{value!r}: the port must be between 1 and 65535")
    return text


KnownHostsLine = Annotated[str, AfterValidator(_check_known_hosts_line)]
MirrorUrl = Annotated[str, AfterValidator(_check_url)]


class SshSection(Section):
    verify_hosts: bool = Field(
        True,
        description="Check SSH host keys strictly: the agent's ssh and git (a read-only "
        "/etc/ssh/ssh_config and /etc/ssh/ssh_known_hosts) and the host's own fetch and push "
        "trust only the keys of `kapsis ssh list`; an unknown or changed key fails the "
        "connection. false: ssh in the sandbox and the host's push use their defaults.",
        json_schema_extra=widest_first(False, True),
    )
    providers: list[GitProvider] = Field(
        default_factory=lambda: list(GIT_PROVIDERS),
        description="Public git hosts whose published keys are trusted (pinned in Kapsis, "
        "updated by `kapsis ssh refresh`).",
        json_schema_extra=SUBSET,
    )
    known_hosts: list[KnownHostsLine] = Field(
        default_factory=list,
        description="More trusted keys, as known_hosts lines: 'HOST[,HOST...] TYPE BASE64' "
        "with HOST a name, an address, or [HOST]:PORT. Hosts added with `kapsis ssh add-host` "
        "are trusted as well.",
        json_schema_extra=SUBSET,
    )


class MavenSection(Section):
    mirror_url: MirrorUrl | None = Field(
        None,
        description="Every remote Maven repository (with block_snapshots: Central, the only one "
        "left) is fetched through this URL: a mirror in the settings.xml mounted read-only at "
        "~/.m2/settings.xml.",
        json_schema_extra=NEEDS_TRUST,
    )
    block_snapshots: bool = Field(
        False,
        description="Releases from Maven Central (or the mirror) only: snapshots are disabled "
        "and every other repository a project or dependency declares is blocked (Maven 3.8.1+ "
        "fails the build naming it).",
        json_schema_extra=FREE,
    )


class NpmSection(Section):
    registry: MirrorUrl | None = Field(
        None,
        description="The npm registry (~/.npmrc, read-only, and NPM_CONFIG_REGISTRY).",
        json_schema_extra=NEEDS_TRUST,
    )


class PipSection(Section):
    index_url: MirrorUrl | None = Field(
        None,
        description="The package index of pip (/etc/pip.conf, read-only, and PIP_INDEX_URL).",
        json_schema_extra=NEEDS_TRUST,
    )
    trusted_host: bool = Field(
        False,
        description="Also mark the index's host as trusted (trusted-host, PIP_TRUSTED_HOST): "
        "needed for a plain-http index; for https it turns off certificate checks.",
        json_schema_extra=FREE,
    )


class BuildToolsSection(Section):
    maven: MavenSection = Field(
        default_factory=MavenSection, description="Maven settings (off unless set)."
    )
    npm: NpmSection = Field(
        default_factory=NpmSection, description="npm settings (off unless set)."
    )
    pip: PipSection = Field(
        default_factory=PipSection, description="pip settings (off unless set)."
    )
