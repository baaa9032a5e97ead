"""Host keys of the public git hosts: pinned in the package, refreshable from the operators' lists.

Each provider publishes its keys somewhere Kapsis can read: GitHub in the ``ssh_keys`` of its
meta API (with their fingerprints alongside), Bitbucket as a known_hosts list, GitLab in its
documentation page (keys and fingerprints in the text). ``kapsis ssh refresh`` fetches them over
HTTPS into ``~/.kapsis/ssh/providers/HOST.json``; a run uses that cache when it is newer than the
pinned copy shipped in ``pinned_known_hosts`` and the pinned keys otherwise, so a host that cannot
reach the providers (or a fetch that fails or parses to nothing) still has keys to check against.

A fetched list replaces, never extends, the pinned one: a key the operator rotated out stops
being trusted. Lists whose keys do not match the fingerprints published with them are refused.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from kapsis import paths
from kapsis.ssh.keys import HostKey, check_key, fingerprint, parse_known_hosts

FETCH_TIMEOUT = 10.0
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
_KEY_RE = r"(ssh-ed25519|ecdsa-sha2-nistp(?:256|384|521)|ssh-rsa)\s+([A-Za-z0-9+/]+={0,2})"


class FetchError(Exception):
    """A provider's list could not be fetched or did not hold usable keys."""


@dataclass(frozen=True)
class Provider:
    host: str
    name: str
    url: str
    parse: Callable[[str, str], list[tuple[str, str]]]  # (body, host) -> [(type, base64)]


def parse_github_meta(body: str, host: str) -> list[tuple[str, str]]:
    """GitHub's meta API: ``ssh_keys`` checked against ``ssh_key_fingerprints``."""
    try:
        data = json.loads(body)
        entries = data["ssh_keys"]
    except (ValueError, KeyError, TypeError):
        raise FetchError("the response is not GitHub's meta JSON with ssh_keys") from None
    keys = []
    for entry in entries:
        key_type, _, blob = str(entry).strip().partition(" ")
        keys.append((key_type, blob.split()[0] if blob else ""))
    published = data.get("ssh_key_fingerprints") or {}
    return _checked(keys, [str(value).removeprefix("SHA256:") for value in published.values()])


def parse_known_hosts_list(body: str, host: str) -> list[tuple[str, str]]:
    """A known_hosts text (Bitbucket's): the lines that name ``host``."""
    try:
        entries = parse_known_hosts(body, "fetched")
    except ValueError as error:
        raise FetchError(f"the response is not a known_hosts list ({error})") from None
    return _checked([(k.key_type, k.key) for k in entries if k.host == host], None)


def parse_docs_page(body: str, host: str) -> list[tuple[str, str]]:
    """A documentation page (GitLab's) holding ``HOST TYPE BASE64`` lines and the fingerprints."""
    import html

    text = html.unescape(re.sub(r"<[^>]+>", "", body))
    keys = re.findall(re.escape(host) + r"\s+" + _KEY_RE, text)
    return _checked(list(dict.fromkeys(keys)), None, page=text)


def _checked(
    keys: list[tuple[str, str]], published: list[str] | None, page: str | None = None
) -> list[tuple[str, str]]:
    """Valid keys only, each one's fingerprint among the published ones when there are any."""
    if not keys:
        raise FetchError("the response holds no host keys")
    for key_type, blob in keys:
        try:
            check_key(key_type, blob)
        except ValueError as error:
            raise FetchError(str(error)) from None
        shown = fingerprint(blob)
        digest = shown.removeprefix("SHA256:")
        if published and digest not in published:
            raise FetchError(f"{key_type} key {shown} is not among the published fingerprints")
        if page is not None and digest not in page:
            raise FetchError(f"{key_type} key {shown} is not among the page's fingerprints")
    return keys


PROVIDERS: dict[str, Provider] = {
    provider.host: provider
    for provider in (
        Provider("github.com", "GitHub", "https://api.github.com/meta", parse_github_meta),
        Provider(
            "gitlab.com", "GitLab", "https://docs.gitlab.com/user/gitlab_com/", parse_docs_page
        ),
        Provider(
            "bitbucket.org", "Bitbucket", "https://bitbucket.org/site/ssh", parse_known_hosts_list
        ),
    )
}
PROVIDER_HOSTS = tuple(PROVIDERS)


@dataclass(frozen=True)
class KeyList:
    """The keys of one provider and where they came from."""

    host: str
    keys: tuple[tuple[str, str], ...]
    origin: str  # "pinned" or "refreshed"
    url: str
    date: dt.datetime

    def host_keys(self) -> list[HostKey]:
        when = self.date.strftime("%Y-%m-%d")
        name = PROVIDERS[self.host].name if self.host in PROVIDERS else self.host
        source = (
            f"pinned in Kapsis: {name}'s published keys of {when}"
            if self.origin == "pinned"
            else f"refreshed from {self.url} on {when}"
        )
        return [HostKey(host=self.host, key_type=t, key=k, source=source) for t, k in self.keys]


@cache
def pinned() -> dict[str, KeyList]:
    """The keys shipped in ``pinned_known_hosts``, by provider (a known_hosts file whose
    ``# @provider``, ``# @recorded`` and ``# @source`` comments say where they came from)."""
    text = (resources.files("kapsis.ssh") / "pinned_known_hosts").read_text(encoding="utf-8")
    meta: dict[str, dict[str, str]] = {}
    keys: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("# @"):
            name, _, value = line[3:].partition(" ")
            if name == "provider":
                current = value.strip()
            meta.setdefault(current, {})[name] = value.strip()
        elif line.strip() and not line.startswith("#"):
            host, key_type, blob = line.split()[:3]
            keys.setdefault(host, []).append((key_type, blob))
    return {
        host: KeyList(
            host,
            tuple(keys[host]),
            "pinned",
            meta[host]["source"],
            dt.datetime.combine(dt.date.fromisoformat(meta[host]["recorded"]), dt.time(), dt.UTC),
        )
        for host in keys
    }


def cache_dir() -> Path:
    return paths.kapsis_home() / "ssh" / "providers"


def cached(host: str) -> KeyList | None:
    """The refreshed list of ``host``, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((cache_dir() / f"{host}.json").read_text(encoding="utf-8"))
        keys = tuple((str(t), str(k)) for t, k in data["keys"])
        for key_type, blob in keys:
            check_key(key_type, blob)
        fetched = dt.datetime.fromisoformat(data["fetched_at"])
        if fetched.tzinfo is None:
            return None  # not what `kapsis ssh refresh` writes: not comparable with the pin
        return KeyList(host, keys, "refreshed", str(data["url"]), fetched)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def effective(host: str) -> KeyList:
    """The refreshed list when it is newer than the pinned one, else the pinned one."""
    shipped = pinned()[host]
    fetched = cached(host)
    if fetched is not None and fetched.date >= shipped.date:
        return fetched
    return shipped


def fetch(provider: Provider, url: str | None = None, timeout: float = FETCH_TIMEOUT) -> KeyList:
    """Fetch and check ``provider``'s list (``url`` overrides where from). Raises FetchError."""
    import urllib.request  # only here: ~20 ms of imports a run does not need

    from kapsis.host.image import kapsis_version

    source = url or provider.url
    request = urllib.request.Request(source, headers={"User-Agent": f"kapsis/{kapsis_version()}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(MAX_RESPONSE_BYTES + 1)
    except OSError as error:  # URLError, HTTPError, timeouts and refused connections
        raise FetchError(f"cannot fetch {source}: {getattr(error, 'reason', error)}") from None
    if len(body) > MAX_RESPONSE_BYTES:
        raise FetchError(f"{source} answered more than {MAX_RESPONSE_BYTES} bytes")
    keys = provider.parse(body.decode("utf-8", errors="replace"), provider.host)
    return KeyList(provider.host, tuple(keys), "refreshed", source, dt.datetime.now(dt.UTC))


def store(keys: KeyList) -> Path:
    """Write a fetched list to the cache (atomically: a run never reads half a file)."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{keys.host}.json"
    partial = target.with_suffix(f".{os.getpid()}.partial")
    payload = {
        "host": keys.host,
        "url": keys.url,
        "fetched_at": keys.date.isoformat(),
        "keys": [list(key) for key in keys.keys],
    }
    partial.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    partial.replace(target)
    return target
