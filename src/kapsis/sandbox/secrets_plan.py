"""Which secrets a run hands to its agent, by name and source only: values are never in a plan.

Sources, strongest first (a name in several takes the first):

1. ``environment.keychain.NAME``: read from the host keychain when the run starts;
2. ``environment.passthrough``: the host environment variable of that name;
3. a secret the agent profile needs (``secrets:``) that no config names: the host environment
   variable of that name, if set.

A name in ``environment.set`` that is also a secret is dropped from the plain environment (the
secret wins). A secret the profile needs that no source provides is an error before anything
starts, unless the profile's subscription login (``login:``) is given instead: that secret,
from any of the sources, goes to the file the CLI reads it from.
"""

from __future__ import annotations

from typing import Literal

from kapsis.agents import AgentProfile
from kapsis.config import base as config_base
from kapsis.config.loader import LoadedConfig
from kapsis.errors import ConfigError
from kapsis.sandbox.plan_model import PlanModel

SecretSource = Literal["keychain", "passthrough", "host-environment"]

# Where the hand-over happens (see kapsis.secrets.delivery): in the sandbox dir on the host, and
# mounted read-only into the sandbox, whose command the init script runs first.
INBOX = "secrets-in"
INIT_SCRIPT = "secrets-init.sh"
INBOX_TARGET = "/run/kapsis/secrets-in"
INIT_TARGET = "/run/kapsis/secrets-init.sh"
SECRETS_TMPFS = config_base.SECRETS_TMPFS
ENTRYPOINT = ("/bin/sh", INIT_TARGET)


class SecretPlan(PlanModel):
    """One secret: its variable name, where its value comes from and where it goes."""

    name: str
    source: SecretSource
    origin: str
    service: str | None = None
    accounts: tuple[str, ...] = ()
    target_file: str | None = None
    template: str | None = None
    # host-environment: the host variable the value is read from, when not ``name`` (the
    # profile's secret_sources, e.g. CODEX_API_KEY from OPENAI_API_KEY).
    host_variable: str | None = None

    @property
    def to_file(self) -> bool:
        return self.target_file is not None

    def render(self, value: str) -> str:
        """What the agent receives: the value, or the file's content from the template."""
        if self.template is None:
            return value
        return self.template.replace("{value}", value)


def plan_secrets(
    loaded: LoadedConfig, profile: AgentProfile, environ: dict[str, str]
) -> tuple[SecretPlan, ...]:
    environment = loaded.config.environment
    login = profile.login
    # The login file goes where the CLI reads it, whatever source gives it.
    login_file = {login.secret: login.file} if login is not None else {}
    planned: dict[str, SecretPlan] = {}
    for name, entry in environment.keychain.items():
        planned[name] = SecretPlan(
            name=name,
            source="keychain",
            origin=str(loaded.origin_of(("environment", "keychain", name))),
            service=entry.service,
            accounts=entry.accounts(),
            target_file=entry.inject_to_file or login_file.get(name),
            template=entry.template,
        )
    for name in environment.passthrough:
        if name in planned:
            continue
        origin = str(loaded.origin_of(("environment", "passthrough")))
        if name not in environ:
            raise ConfigError(
                f"{origin}: environment.passthrough: {name} is not set in the host environment; "
                "set it or remove it from the list"
            )
        planned[name] = SecretPlan(
            name=name, source="passthrough", origin=origin, target_file=login_file.get(name)
        )
    if login is not None and login.secret not in planned and login.secret in environ:
        planned[login.secret] = SecretPlan(
            name=login.secret,
            source="host-environment",
            origin=f"agent profile {profile.name} ({profile.source}), its login",
            target_file=login.file,
        )
    logged_in = login is not None and login.secret in planned
    for name in profile.secrets:
        if name in planned or (logged_in and login is not None and name in login.replaces):
            continue
        sources = profile.secret_sources.get(name) or [name]
        found = next((variable for variable in sources if variable in environ), None)
        if found is not None:
            origin = f"agent profile {profile.name} ({profile.source})"
            planned[name] = SecretPlan(
                name=name,
                source="host-environment",
                origin=origin if found == name else f"{origin}, from ${found}",
                host_variable=None if found == name else found,
            )
        elif name not in environment.set:
            exports = " or ".join(sources)
            raise ConfigError(
                f"agent '{profile.name}' needs the secret {name}, and no source has it: not in "
                f"environment.keychain or environment.passthrough of the config, nor in the host "
                f"environment; add `environment.keychain.{name}: {{service: ..., account: ...}}` "
                f"to agent-sandbox.yaml, or export {exports}"
                + (f" (or give the subscription login {login.secret})" if login else "")
            )
    return tuple(planned.values())


def uses_login(profile: AgentProfile, secrets: tuple[SecretPlan, ...]) -> bool:
    """Whether the run hands the CLI its subscription login (whose hosts are then allowed)."""
    login = profile.login
    return login is not None and any(secret.name == login.secret for secret in secrets)
