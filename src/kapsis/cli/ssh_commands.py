"""``kapsis ssh``: the SSH host keys runs trust (list, add-host, remove-host, refresh)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from kapsis.cli.common import fail as _fail
from kapsis.errors import ConfigError, ExitCode, KapsisError

ssh_app = typer.Typer(
    help="SSH host keys: what the sandbox's ssh and the host's push trust.", no_args_is_help=True
)

HostArg = Annotated[
    str, typer.Argument(help="HOST, HOST:PORT or [ADDRESS]:PORT (port 22 by default).")
]


@ssh_app.command("list")
def ssh_list(
    project: Annotated[
        Path | None, typer.Argument(help="Project whose config files apply (default: .).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Config file; beats other files.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="JSON for scripts.")] = False,
) -> None:
    """Show every trusted host key, its fingerprint and where it came from."""
    from kapsis.config.loader import load_config
    from kapsis.ssh.trust import trusted_keys

    try:
        loaded = load_config(project or Path.cwd(), config)
        keys = trusted_keys(loaded)
    except KapsisError as error:
        _fail(error)
    verify = loaded.config.ssh.verify_hosts
    if json_output:
        entries = [{**key.model_dump(), "fingerprint": key.fingerprint} for key in keys]
        print(json.dumps({"verify_hosts": verify, "keys": entries}, indent=2))
        return
    # Grouped lines rather than a table: a fingerprint must be shown whole, at any width.
    group = None
    for key in keys:
        if (key.host, key.source) != group:
            group = (key.host, key.source)
            print(f"{key.host}  ({key.source})")
        print(f"  {key.key_type:<20} {key.fingerprint}")
    if not keys:
        print("no trusted host keys: every SSH connection will be refused")
    if not verify:
        print("ssh.verify_hosts is false: runs with this config check none of these keys")


@ssh_app.command("add-host")
def ssh_add_host(
    host: HostArg,
    key: Annotated[
        list[str] | None,
        typer.Option(
            "--key",
            help="Pin this public key ('ssh-ed25519 AAAA...'), got from the host's "
            "administrator: safer than scanning, which believes whoever answers first. "
            "Repeat for several keys.",
        ),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Trust scanned keys without asking.")
    ] = False,
) -> None:
    """Trust an SSH host (e.g. an enterprise git server): pin its keys, or scan them.

    Without --key the keys are fetched with ssh-keyscan and their fingerprints shown; compare
    them with the ones the host's administrator publishes before you accept (trust on first
    use). Replaces what was trusted for HOST before.
    """
    from kapsis.ssh import hosts
    from kapsis.ssh.keys import parse_host

    try:
        name, port = parse_host(host)
    except ValueError as error:
        _fail(ConfigError(f"HOST: {error}"))
    try:
        if key:
            keys = hosts.keys_from_text(name, port, key, hosts.PINNED)
            how = hosts.PINNED
        else:
            keys = hosts.scan(name, port)
            how = hosts.SCANNED
    except KapsisError as error:
        _fail(error)
    print(f"{keys[0].host}: {how}")
    for item in keys:
        print(f"  {item.key_type:<22} {item.fingerprint}")
    if not key and not yes:
        if not sys.stdin.isatty():
            _fail(
                ConfigError(
                    "not trusted: pass --yes to trust keys scanned from the network, or pin "
                    "them with --key 'TYPE BASE64' got from the host's administrator"
                )
            )
        if not typer.confirm("Do these fingerprints match the host's published ones?"):
            raise typer.Exit(int(ExitCode.USAGE))
    path = hosts.save(keys, how)
    print(f"trusted; saved in {path}")


@ssh_app.command("remove-host")
def ssh_remove_host(host: HostArg) -> None:
    """Stop trusting a host added with add-host."""
    from kapsis.ssh import hosts

    try:
        removed = hosts.remove(host)
    except ValueError as error:
        _fail(ConfigError(f"HOST: {error}"))
    if not removed:
        _fail(ConfigError(f"{host} was not added; `kapsis ssh list` shows what is trusted"))
    print(f"{host}: no longer trusted")


@ssh_app.command("refresh")
def ssh_refresh(
    provider: Annotated[
        list[str] | None,
        typer.Option("--provider", help="Only this host (github.com, gitlab.com, bitbucket.org)."),
    ] = None,
) -> None:
    """Fetch GitHub's, GitLab's and Bitbucket's published host keys into the cache.

    A provider that cannot be reached keeps its cached or pinned keys; exit 1 if any failed.
    """
    from kapsis.ssh import providers

    chosen = provider or list(providers.PROVIDER_HOSTS)
    unknown = [name for name in chosen if name not in providers.PROVIDERS]
    if unknown:
        known = ", ".join(providers.PROVIDER_HOSTS)
        _fail(ConfigError(f"--provider {unknown[0]}: not a provider; use one of {known}"))
    failed = False
    for name in chosen:
        kept = providers.effective(name)
        before = {key for _, key in kept.keys}
        try:
            fetched = providers.fetch(providers.PROVIDERS[name])
        except providers.FetchError as error:
            failed = True
            print(f"{name}: {error}; still trusting the {kept.origin} keys of {kept.date:%Y-%m-%d}")
            continue
        providers.store(fetched)
        after = {key for _, key in fetched.keys}
        change = (
            "unchanged"
            if after == before
            else (f"changed: {len(after - before)} new, {len(before - after)} no longer trusted")
        )
        print(f"{name}: {len(fetched.keys)} keys from {fetched.url} ({change})")
    if failed:
        raise typer.Exit(1)
