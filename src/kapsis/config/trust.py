"""Which values of a project's own config files need the user's trust, judged by field markers.

A project's ``agent-sandbox.yaml`` and ``.kapsis/config.yaml`` (and ``./agent-sandbox.yaml``) are
files the agent can edit and the host later reads, so they are untrusted until the user runs
``kapsis trust``. Flags, ``--config FILE`` and the user's own config are trusted.

Each leaf field of :class:`~kapsis.config.models.KapsisConfig` carries one marker
(:data:`~kapsis.config.base.TRUST_KEY` in its JSON Schema). A value that came from an untrusted
file is compared with the value the trusted sources alone give (the user's default): a marker
says which differences are fine (narrower: less memory, fewer hosts, a stricter profile) and
which need trust (wider, or anything at all for a key that runs or hands over something).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from kapsis import paths
from kapsis.config.base import TRUST_KEY, Section
from kapsis.config.models import duration_to_seconds as _seconds, memory_to_bytes
from kapsis.errors import ConfigError, UntrustedConfigError

if TYPE_CHECKING:
    from kapsis.config.loader import KeyPath, LoadedConfig, Origin


@dataclass(frozen=True)
class TrustProblem:
    """One value of an untrusted file that needs trust."""

    origin: Origin
    key: str
    # What it does, e.g. "'open' is wider than your default 'filtered'".
    detail: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.key}: {self.detail}"


def marker(info: Any) -> Any:
    """The trust marker of a field (a FieldInfo): "free", "trust", ... or {"order": [...]}."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return extra.get(TRUST_KEY)


def leaf_fields(model: type[BaseModel], prefix: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    """Every field of the config that is not a section, with its key path."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            yield from leaf_fields(annotation, (*prefix, name))
        else:
            yield (*prefix, name), info


def allows(rule: Any, value: Any, trusted: Any, extra: frozenset[Any] = frozenset()) -> bool:
    """Whether ``value`` (from an untrusted file) is fine next to the ``trusted`` one.

    ``extra``: for "subset", items allowed besides the trusted ones; for "profile", the agent
    profiles that get nothing more than the trusted one.
    """
    if value == trusted or rule == "free":
        return True
    if rule == "trust":
        return False
    if rule == "at_most":
        return _amount(value, duration_to_seconds=False) <= _amount(trusted, False)
    if rule == "at_most_time":
        return _amount(value, duration_to_seconds=True) <= _amount(trusted, True)
    if rule == "profile":
        return value in extra
    if rule == "subset":
        if isinstance(value, Mapping):
            return all(key in trusted and trusted[key] == item for key, item in value.items())
        return all(item in trusted or item in extra for item in value)
    if rule == "superset":
        # A "!" line un-hides in a .gitignore-style list: a negation is no narrowing.
        added = [item for item in value if item not in trusted]
        return all(item in value for item in trusted) and not any(
            str(item).startswith("!") for item in added
        )
    if isinstance(rule, Mapping) and "order" in rule:
        order = list(rule["order"])
        return value in order and trusted in order and order.index(value) >= order.index(trusted)
    raise ConfigError(f"config models: unknown trust marker {rule!r}")  # a bug, never input


def _amount(value: Any, duration_to_seconds: bool) -> float:
    """A limit as a number to compare: none is no limit at all; a size in bytes, a duration
    in seconds ("30m" is half an hour there, 30 MiB here)."""
    if value is None:
        return float("inf")
    if isinstance(value, int | float) and not isinstance(value, str):
        return float(value)
    if duration_to_seconds:
        return float(_seconds(str(value)))
    return float(memory_to_bytes(str(value)))


Resolver = Callable[[BaseModel], Any]


def trust_problems(
    loaded: LoadedConfig,
    extra_allowed: Mapping[KeyPath, frozenset[Any]] | None = None,
    resolve: Mapping[KeyPath, Resolver] | None = None,
) -> list[TrustProblem]:
    """The values of untrusted files that need trust, in key order.

    ``extra_allowed`` adds items a subset-marked key may hold without trust (for the allowlist:
    the agent profile's hosts and those of the trusted categories, which the run has anyway).
    ``resolve`` gives the value a key stands for where its own does not say (``resources.pids:
    null`` is the security profile's limit, not none), from the whole config.
    """
    untrusted = {source.path for source in loaded.sources if not source.trusted}
    if not untrusted:
        return []
    problems = []
    for path, info in leaf_fields(type(loaded.config)):
        origin = _untrusted_origin(loaded, path, untrusted)
        if origin is None:
            continue
        resolver = (resolve or {}).get(path)
        value = resolver(loaded.config) if resolver else _value_at(loaded.config, path)
        trusted = (
            resolver(loaded.trusted_config) if resolver else _value_at(loaded.trusted_config, path)
        )
        rule = marker(info)
        extra = (extra_allowed or {}).get(path, frozenset())
        if not allows(rule, value, trusted, extra):
            detail = _detail(rule, value, trusted, extra)
            problems.append(TrustProblem(origin, ".".join(map(str, path)), detail))
    return sorted(problems, key=lambda p: (str(p.origin.file), p.origin.line or 0))


def _detail(rule: Any, value: Any, trusted: Any, extra: frozenset[Any]) -> str:
    if rule == "profile":
        return (
            f"the agent profile {_shown(value)} gets secrets or hosts that your default "
            f"{_shown(trusted)} does not"
        )
    if rule in ("at_most", "at_most_time"):
        return f"{_shown(value)} is above your default {_shown(trusted)}"
    if rule == "subset":
        added = (
            [key for key in value if key not in trusted or value[key] != trusted[key]]
            if (isinstance(value, Mapping))
            else [item for item in value if item not in trusted and item not in extra]
        )
        return f"adds {_shown(added[0])} to what the sandbox may reach or receive"
    if rule == "superset":
        dropped = [item for item in trusted if item not in value]
        if not dropped:
            negation = next(i for i in value if i not in trusted and str(i).startswith("!"))
            return f"adds the exception {_shown(negation)}, which un-hides what your default hides"
        return f"drops {_shown(dropped[0])}, which your default holds"
    if isinstance(rule, Mapping):
        return f"{_shown(value)} is wider than your default {_shown(trusted)}"
    return "setting it acts outside the sandbox (on the host, or on what the run may reach)"


def _shown(value: Any) -> str:
    if value is None:
        return "none (no limit)"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def require_trusted(
    loaded: LoadedConfig,
    extra_allowed: Mapping[KeyPath, frozenset[Any]] | None = None,
    resolve: Mapping[KeyPath, Resolver] | None = None,
) -> None:
    """Refuse (exit 2) a config whose untrusted files set a value that needs trust."""
    problems = trust_problems(loaded, extra_allowed, resolve)
    if not problems:
        return
    first = problems[0]
    assert first.origin.file is not None
    project = _project_of(first.origin.file)
    more = f" [and {len(problems) - 1} more key(s) that need trust]" if len(problems) > 1 else ""
    raise UntrustedConfigError(
        f"{first}; this file is not trusted (an agent can edit it): review it and run "
        f"`kapsis trust {project}`, or move the key to your own {paths.user_config_file()}{more}"
    )


def _project_of(file: Any) -> Any:
    # PROJECT/.kapsis/config.yaml belongs to PROJECT; an agent-sandbox.yaml to its folder.
    parent = file.parent
    return parent.parent if parent.name == ".kapsis" else parent


def _untrusted_origin(loaded: LoadedConfig, path: KeyPath, untrusted: set[Any]) -> Origin | None:
    """Where an untrusted file set the value at ``path`` or something inside it (a mapping's
    key merged from an untrusted file counts, though the mapping itself came from elsewhere)."""
    own = loaded.origin_of(path)
    if own.kind == "file" and own.file in untrusted:
        return own
    if own.kind == "flag" or (own.kind == "file" and own.file not in untrusted):
        # A trusted source set the whole value (a list replaces; a mapping merges key by key).
        inside = [
            origin
            for key, origin in loaded.origins.items()
            if key[: len(path)] == path and len(key) > len(path)
            and origin.kind == "file" and origin.file in untrusted
        ]  # fmt: skip
        return inside[0] if inside else None
    return None


def _value_at(config: BaseModel, path: KeyPath) -> Any:
    value: Any = config
    for step in path:
        value = getattr(value, str(step))
    return value
