"""Refreshing the providers' host keys: parsing each list, caching, falling back to the pins.

The fetches go to an HTTP server on 127.0.0.1 that the test runs; never to a provider.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from kapsis.cli.app import app
from kapsis.ssh import providers
from kapsis.ssh.keys import fingerprint

from .test_ssh_keys import GITHUB_ECDSA, GITHUB_ED25519

NEW_KEY = "AAAAC3NzaC1lZDI1NTE5AAAAIAfuCHKVTjquxvt6CM6tdG4SLp1Btn/nOeHHE5UOzRdf"


def digest(blob: str) -> str:
    return fingerprint(blob).removeprefix("SHA256:")


def github_meta(keys: list[str], prints: list[str]) -> str:
    return json.dumps(
        {
            "ssh_keys": keys,
            "ssh_key_fingerprints": {f"SHA256_{i}": p for i, p in enumerate(prints)},
            "hooks": ["192.30.252.0/22"],
        }
    )


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, tuple[int, str]]]]:
    """A loopback HTTP server answering each path from a table the test fills in."""
    pages: dict[str, tuple[int, str]] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = pages.get(self.path, (404, "not found"))
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", pages
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_github_meta_keys_must_match_the_published_fingerprints():
    keys = [f"ssh-ed25519 {GITHUB_ED25519}", f"ecdsa-sha2-nistp256 {GITHUB_ECDSA}"]
    body = github_meta(keys, [digest(GITHUB_ED25519), digest(GITHUB_ECDSA)])
    assert providers.parse_github_meta(body, "github.com") == [
        ("ssh-ed25519", GITHUB_ED25519),
        ("ecdsa-sha2-nistp256", GITHUB_ECDSA),
    ]
    with pytest.raises(providers.FetchError, match="not among the published"):
        providers.parse_github_meta(github_meta(keys, [digest(GITHUB_ED25519)]), "github.com")
    with pytest.raises(providers.FetchError, match="ssh_keys"):
        providers.parse_github_meta('{"hooks": []}', "github.com")
    with pytest.raises(providers.FetchError, match="no host keys"):
        providers.parse_github_meta(github_meta([], []), "github.com")


def test_a_docs_page_yields_the_keys_whose_fingerprints_it_shows():
    # Keys split across highlighting spans, HTML entities, the fingerprint table elsewhere.
    page = (
        f"<table><tr><td>ED25519</td><td><code>{digest(NEW_KEY)}</code></td></tr></table>"
        f'<pre><span class="line">gitlab.com <span>ssh-ed25519</span> {NEW_KEY}</span>\n'
        f"other.example ssh-ed25519 {GITHUB_ED25519}</pre>"
    )
    assert providers.parse_docs_page(page, "gitlab.com") == [("ssh-ed25519", NEW_KEY)]
    without_prints = page.replace(digest(NEW_KEY), "elsewhere")
    with pytest.raises(providers.FetchError, match="page's fingerprints"):
        providers.parse_docs_page(without_prints, "gitlab.com")


def test_a_known_hosts_list_gives_the_provider_s_own_lines():
    body = f"bitbucket.org ssh-ed25519 {NEW_KEY}\nother.org ssh-ed25519 {GITHUB_ED25519}\n"
    assert providers.parse_known_hosts_list(body, "bitbucket.org") == [("ssh-ed25519", NEW_KEY)]
    with pytest.raises(providers.FetchError):
        providers.parse_known_hosts_list("<html>maintenance</html>", "bitbucket.org")


def test_a_fetched_list_is_cached_and_replaces_the_pinned_one(server, kapsis_home):
    base, pages = server
    pages["/site/ssh"] = (200, f"bitbucket.org ssh-ed25519 {NEW_KEY}\n")
    pinned_before = providers.effective("bitbucket.org")
    assert pinned_before.origin == "pinned"

    fetched = providers.fetch(providers.PROVIDERS["bitbucket.org"], f"{base}/site/ssh")
    providers.store(fetched)

    now = providers.effective("bitbucket.org")
    assert now.origin == "refreshed" and now.keys == (("ssh-ed25519", NEW_KEY),)
    keys = now.host_keys()
    assert keys[0].host == "bitbucket.org"
    assert keys[0].source.startswith(f"refreshed from {base}/site/ssh on ")
    # Rotated-out keys are gone: the pinned ones are not added back.
    assert len(keys) == 1


def test_a_cache_older_than_the_pinned_keys_is_not_used(kapsis_home):
    stale = providers.KeyList(
        "github.com",
        (("ssh-ed25519", NEW_KEY),),
        "refreshed",
        "https://api.github.com/meta",
        dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
    )
    providers.store(stale)
    assert providers.cached("github.com") is not None
    assert providers.effective("github.com").origin == "pinned"


def test_a_damaged_cache_falls_back_to_the_pinned_keys(kapsis_home):
    folder = providers.cache_dir()
    folder.mkdir(parents=True)
    (folder / "gitlab.com.json").write_text('{"keys": [["ssh-ed25519", "AAAA"]], "url": "x"}')
    assert providers.cached("gitlab.com") is None
    assert providers.effective("gitlab.com").origin == "pinned"


def test_a_cache_without_a_timezone_falls_back_to_the_pinned_keys(kapsis_home):
    folder = providers.cache_dir()
    folder.mkdir(parents=True)
    naive = {"keys": [["ssh-ed25519", NEW_KEY]], "url": "x", "fetched_at": "2030-01-01T00:00:00"}
    (folder / "gitlab.com.json").write_text(json.dumps(naive))
    assert providers.cached("gitlab.com") is None
    assert providers.effective("gitlab.com").origin == "pinned"


def test_fetch_failures_are_fetch_errors(server):
    base, pages = server
    provider = providers.PROVIDERS["github.com"]
    with pytest.raises(providers.FetchError, match="cannot fetch"):
        providers.fetch(provider, f"{base}/missing")
    pages["/meta"] = (200, "<html>not json</html>")
    with pytest.raises(providers.FetchError, match="meta JSON"):
        providers.fetch(provider, f"{base}/meta")
    closed = base.rsplit(":", 1)[0] + ":1"  # nothing listens on port 1 of loopback
    with pytest.raises(providers.FetchError, match="cannot fetch"):
        providers.fetch(provider, closed, timeout=2)


def test_refresh_command_stores_what_it_fetched_and_reports_failures(
    server, kapsis_home, monkeypatch
):
    base, pages = server
    pages["/meta"] = (200, github_meta([f"ssh-ed25519 {NEW_KEY}"], [digest(NEW_KEY)]))
    for host, path in (("github.com", "/meta"), ("gitlab.com", "/down")):
        original = providers.PROVIDERS[host]
        monkeypatch.setitem(
            providers.PROVIDERS,
            host,
            providers.Provider(original.host, original.name, base + path, original.parse),
        )

    result = CliRunner().invoke(
        app, ["ssh", "refresh", "--provider", "github.com", "--provider", "gitlab.com"]
    )

    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"github.com: 1 keys from {base}/meta (changed: 1 new, 3 no longer trusted)"
    assert (
        lines[1].startswith("gitlab.com: cannot fetch") and "still trusting the pinned" in lines[1]
    )
    listed = CliRunner().invoke(app, ["ssh", "list"]).stdout
    assert f"refreshed from {base}/meta" in listed and digest(NEW_KEY) in listed
    assert "GitLab's published keys" in listed


def test_refresh_names_an_unknown_provider():
    result = CliRunner().invoke(app, ["ssh", "refresh", "--provider", "example.com"])
    assert result.exit_code == 2
    assert "not a provider" in result.stderr
