"""Find, read, merge and validate configuration, remembering where every value came from.

Sources, highest precedence first: command-line flags, ``--config FILE``, ``./agent-sandbox.yaml``,
``PROJECT/agent-sandbox.yaml``, ``PROJECT/.kapsis/config.yaml``, ``~/.config/kapsis/config.yaml``,
then the defaults in :mod:`kapsis.config.models`. Mappings merge key by key; any other value
(lists included) is replaced whole by the higher source.

A validation error is reported as one line: ``FILE:LINE: key.path: problem (what is allowed)``.

The project's own files (and ``./agent-sandbox.yaml``) are untrusted sources unless the user
trusted them as they are (:mod:`kapsis.config.trust_store`); the loaded config keeps what the
trusted sources alone give, for :mod:`kapsis.config.trust` to compare with.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from kapsis import paths
from kapsis.config import trust_store
from kapsis.config.models import KapsisConfig
from kapsis.errors import ConfigError

KeyPath = tuple[str | int, ...]
ModelT = TypeVar("ModelT", bound=BaseModel)
CONFIG_FILE_NAME = "agent-sandbox.yaml"
# A project's own config files, relative to it: untrusted until `kapsis trust`.
PROJECT_CONFIG_FILES = (CONFIG_FILE_NAME, ".kapsis/config.yaml")


@dataclass(frozen=True)
class Origin:
    """Where one config value came from."""

    kind: str  # "default", "file" or "flag"
    file: Path | None = None
    line: int | None = None
    flag: str | None = None

    def __str__(self) -> str:
        if self.kind == "file" and self.file is not None:
            return f"{self.file}:{self.line}" if self.line else str(self.file)
        if self.kind == "flag":
            return f"flag {self.flag}"
        return "default"


DEFAULT_ORIGIN = Origin("default")


@dataclass
class ConfigLayer:
    """One source of configuration: plain data plus the origin of each key path in it."""

    data: dict[str, Any]
    origins: dict[KeyPath, Origin] = field(default_factory=dict)
    label: Origin = DEFAULT_ORIGIN
    sha256: str | None = field(default=None, compare=False)  # of the bytes parsed


@dataclass(frozen=True)
class ConfigSource:
    """A config file that applies, and whether its values are trusted."""

    path: Path
    sha256: str
    trusted: bool
    # Why: "--config", "user config", "trusted" (recorded by `kapsis trust`) or "untrusted".
    standing: str
    # How the record of trust names it (see _Candidate), and whether it is the project's own.
    place: str = ""
    in_project: bool = False


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config and the origin of every value that did not come from the defaults."""

    config: KapsisConfig
    origins: Mapping[KeyPath, Origin]
    files: tuple[Path, ...]
    sections: frozenset[KeyPath] = frozenset()
    sources: tuple[ConfigSource, ...] = ()
    # What the trusted sources alone give (flags, --config, the user's config, defaults): what
    # an untrusted file's values are compared with. None: every source is trusted.
    trusted_only: KapsisConfig | None = None

    @property
    def trusted_config(self) -> KapsisConfig:
        return self.trusted_only if self.trusted_only is not None else self.config

    def is_trusted(self, origin: Origin) -> bool:
        """Whether a value of this origin came from a trusted source."""
        return origin.kind != "file" or all(
            source.trusted for source in self.sources if source.path == origin.file
        )

    def origin_of(self, path: KeyPath) -> Origin:
        """Where the value at ``path`` came from: its own key, or a list/value that holds it.

        A section (mapping) that a file or flag mentions does not make its other keys its own:
        a key nobody set is a default.
        """
        for end in range(len(path), 0, -1):
            prefix = path[:end]
            if end < len(path) and prefix in self.sections:
                break
            found = self.origins.get(prefix)
            if found is not None:
                return found
        return DEFAULT_ORIGIN


def candidate_files(project: Path | None, explicit: Path | None) -> list[Path]:
    """The config files that apply, highest precedence first, each listed once."""
    return [found.path for found in _candidates(project, explicit)]


@dataclass(frozen=True)
class _Candidate:
    path: Path
    standing: str
    # Where the record of trust names it: its folder's real path (the project's, or the
    # current folder's) and its name below it as found, so that no link below the project
    # (a linked .kapsis folder) makes it another project's file.
    place: str
    # Whether it is the project's own, not ./agent-sandbox.yaml of another folder.
    in_project: bool


def _candidates(project: Path | None, explicit: Path | None) -> list[_Candidate]:
    """Each file with its standing by role: ``--config`` and the user's config are the user's
    own; the project's files and ./agent-sandbox.yaml are what an agent may have written."""
    if explicit is not None and not explicit.is_file():
        raise ConfigError(f"--config {explicit}: no such file; pass the path of a YAML file")
    cwd = Path.cwd()
    candidates: list[tuple[Path | None, str, Path | None]] = [
        (explicit, "--config", None),
        (cwd / CONFIG_FILE_NAME, "untrusted", cwd),
    ]
    if project is not None:
        candidates += [(project / name, "untrusted", project) for name in PROJECT_CONFIG_FILES]
    candidates.append((paths.user_config_file(), "user config", None))
    real_project = project.resolve() if project is not None else None
    found: dict[Path, _Candidate] = {}
    for candidate, standing, root in candidates:
        if candidate is None or not candidate.is_file():
            continue
        resolved = candidate.resolve()
        if resolved not in found:
            base = root.resolve() if root is not None else candidate.absolute().parent
            relative = candidate.relative_to(root) if root is not None else candidate.name
            found[resolved] = _Candidate(
                candidate, standing, str(base / relative), base == real_project
            )
        elif standing != "untrusted":
            # One file reached twice (a project file linked to the user's own config): it keeps
            # its place, and the standing of the user's own.
            kept = found[resolved]
            found[resolved] = _Candidate(kept.path, standing, kept.place, kept.in_project)
    return list(found.values())


def read_yaml_layer(path: Path) -> ConfigLayer:
    """Parse one YAML file, keeping the line number of every key."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError

    yaml = YAML(typ="rt")
    try:
        # Read once: the hash that decides trust is of exactly the bytes that are parsed.
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: a config file of over {MAX_CONFIG_BYTES // 1024} KiB; a real one is "
                "a few lines"
            )
        text = raw.decode("utf-8")
        document = yaml.load(text)
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config file") from None
    except MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = error.problem or error.context or "invalid YAML"
        raise ConfigError(f"{path}:{line}: invalid YAML: {problem}; fix the syntax") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read config file: {error}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if document is None:
        return ConfigLayer({}, {}, Origin("file", path), digest)
    if not isinstance(document, Mapping):
        raise ConfigError(
            f"{path}:1: the config file must be a mapping of sections, e.g. 'resources:'"
        )
    origins: dict[KeyPath, Origin] = {}
    data = _plain(document, (), path, origins, set())
    return ConfigLayer(data, origins, Origin("file", path), digest)


# Bounds on a config file: it may be the agent's, and the host parses it.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_DEPTH = 32


def _plain(
    node: Any, prefix: KeyPath, path: Path, origins: dict[KeyPath, Origin], seen: set[int]
) -> Any:
    """Turn ruamel's nodes into plain dicts and lists, recording each key's line.

    Refused: a mapping or list reached twice (a YAML alias: a few bytes of aliases expand to
    gigabytes), merge keys (``<<``, whose keys have no line of their own), deep nesting.
    """
    if isinstance(node, Mapping | list):
        where = ".".join(map(str, prefix)) or "the top level"
        if len(prefix) > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{path}: {where}: nested more than {MAX_CONFIG_DEPTH} levels deep")
        if id(node) in seen:
            raise ConfigError(
                f"{path}: {where}: YAML aliases of mappings or lists are not supported; "
                "write the values out"
            )
        seen.add(id(node))
        if getattr(node, "merge", None):
            raise ConfigError(
                f"{path}: {where}: YAML merge keys (<<) are not supported; write the keys out"
            )
    if isinstance(node, Mapping):
        result: dict[str, Any] = {}
        for key, value in node.items():
            key_path = (*prefix, str(key))
            line = node.lc.key(key)[0] + 1 if hasattr(node, "lc") else None
            origins[key_path] = Origin("file", path, line)
            result[str(key)] = _plain(value, key_path, path, origins, seen)
        return result
    if isinstance(node, list):
        items = []
        for index, value in enumerate(node):
            item_path = (*prefix, index)
            line = node.lc.item(index)[0] + 1 if hasattr(node, "lc") else None
            origins[item_path] = Origin("file", path, line)
            items.append(_plain(value, item_path, path, origins, seen))
        return items
    if node is not None and type(node).__module__.startswith("ruamel"):
        # ruamel wraps scalars (ScalarFloat, ScalarBoolean...); give pydantic the plain type.
        for plain_type in (bool, int, float, str):
            if isinstance(node, plain_type):
                return plain_type(node)
    return node


def flag_layer(values: Mapping[str, tuple[str, Any]]) -> ConfigLayer:
    """Build a layer from flags: ``{"resources.memory": ("--memory", "2g"), ...}``."""
    data: dict[str, Any] = {}
    origins: dict[KeyPath, Origin] = {}
    for dotted, (flag, value) in values.items():
        if value is None:
            continue
        keys = dotted.split(".")
        target = data
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = value
        origins[tuple(keys)] = Origin("flag", flag=flag)
    return ConfigLayer(data, origins, Origin("flag"))


def merge_layers(layers: Iterable[ConfigLayer]) -> tuple[dict[str, Any], dict[KeyPath, Origin]]:
    """Merge layers given highest precedence first."""
    merged: dict[str, Any] = {}
    origins: dict[KeyPath, Origin] = {}
    for layer in reversed(list(layers)):
        _merge_into(merged, layer.data, (), layer, origins)
    return merged, origins


def _merge_into(
    target: dict[str, Any],
    source: Mapping[str, Any],
    prefix: KeyPath,
    layer: ConfigLayer,
    origins: dict[KeyPath, Origin],
) -> None:
    for key, value in source.items():
        key_path = (*prefix, key)
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            origins.setdefault(key_path, layer.origins.get(key_path, layer.label))
            _merge_into(target[key], value, key_path, layer, origins)
            continue
        # A copy: a later layer merges into it, and the layer itself must stay as it was read
        # (the trusted layers are merged again, alone).
        target[key] = copy.deepcopy(value)
        # A replaced value takes all its origins from the new layer.
        for stale in [p for p in origins if p[: len(key_path)] == key_path]:
            del origins[stale]
        for own_path, own_origin in layer.origins.items():
            if own_path[: len(key_path)] == key_path:
                origins[own_path] = own_origin
        origins.setdefault(key_path, layer.label)


def validate(data: Mapping[str, Any], origins: Mapping[KeyPath, Origin]) -> KapsisConfig:
    return validate_model(KapsisConfig, data, origins)


def validate_model(
    model: type[ModelT],
    data: Mapping[str, Any],
    origins: Mapping[KeyPath, Origin],
    where: str = "config",
) -> ModelT:
    """Validate ``data`` against ``model``, turning the first error into a one-line ConfigError.

    ``where`` names the source when the error has no line of its own (a missing key).
    """
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, origins, model, where)) from None


def describe_validation_error(
    error: ValidationError,
    origins: Mapping[KeyPath, Origin],
    root: type[BaseModel] = KapsisConfig,
    where_default: str = "config",
) -> str:
    """One line for the first problem: where, which key, what is wrong, what is allowed."""
    problems = error.errors(include_url=False)
    first = problems[0]
    loc: KeyPath = tuple(first["loc"])
    where = _nearest_origin(loc, origins) or where_default
    dotted = _dotted(loc)
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(_fields_at(loc[:-1], root)))
        text = f"unknown key '{loc[-1]}'; allowed here: {allowed}"
    else:
        text = first["msg"].removeprefix("Value error, ")
        allowed_hint = None if first["type"] == "literal_error" else _allowed_hint(loc, root)
        if allowed_hint:
            text = f"{text} (expected: {allowed_hint})"
    more = f" [and {len(problems) - 1} more problem(s)]" if len(problems) > 1 else ""
    return f"{where}: {dotted}: {text}{more}"


def _nearest_origin(loc: KeyPath, origins: Mapping[KeyPath, Origin]) -> str | None:
    for end in range(len(loc), 0, -1):
        found = origins.get(loc[:end])
        if found is not None:
            return str(found)
    return None


def _dotted(loc: KeyPath) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _model_at(loc: KeyPath, root: type[BaseModel]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        info = model.model_fields.get(part)
        if info is None:
            return None
        annotation = info.annotation
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
        if model is None:
            # list[Model] and similar: look one level into the type arguments.
            for arg in getattr(annotation, "__args__", ()):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    model = arg
    return model


def _fields_at(loc: KeyPath, root: type[BaseModel]) -> list[str]:
    model = _model_at(loc, root)
    return list(model.model_fields) if model is not None else []


def _allowed_hint(loc: KeyPath, root: type[BaseModel]) -> str | None:
    parent = _model_at(loc[:-1], root)
    if parent is None or not loc or isinstance(loc[-1], int):
        return None
    info = parent.model_fields.get(str(loc[-1]))
    return info.description if info is not None else None


def load_config(
    project: Path | None = None,
    config_file: Path | None = None,
    flags: Mapping[str, tuple[str, Any]] | None = None,
) -> LoadedConfig:
    """Load the effective configuration for a run on ``project``.

    Nothing is refused for trust here (``kapsis config show`` shows untrusted values); a run
    checks with :func:`kapsis.config.trust.require_trusted`.
    """
    found = _candidates(project, config_file)
    flags_layer = flag_layer(flags or {})
    file_layers = [read_yaml_layer(candidate.path) for candidate in found]
    sources = tuple(
        _source(candidate, layer.sha256 or "")
        for candidate, layer in zip(found, file_layers, strict=True)
    )
    data, origins = merge_layers([flags_layer, *file_layers])
    config = validate(data, origins)
    trusted_only = None
    if not all(source.trusted for source in sources):
        kept = [layer for layer, source in zip(file_layers, sources, strict=True) if source.trusted]
        trusted_data, trusted_origins = merge_layers([flags_layer, *kept])
        trusted_only = validate(trusted_data, trusted_origins)
    return LoadedConfig(
        config,
        origins,
        tuple(candidate.path for candidate in found),
        _mapping_paths(data, ()),
        sources,
        trusted_only,
    )


def _source(candidate: _Candidate, sha256: str) -> ConfigSource:
    standing = candidate.standing
    if standing == "untrusted" and trust_store.is_trusted(candidate.place, sha256):
        standing = "trusted"
    return ConfigSource(
        candidate.path,
        sha256,
        standing != "untrusted",
        standing,
        candidate.place,
        candidate.in_project,
    )


def _mapping_paths(value: Any, prefix: KeyPath) -> frozenset[KeyPath]:
    if not isinstance(value, Mapping):
        return frozenset()
    found = {prefix} if prefix else set()
    for key, item in value.items():
        found |= _mapping_paths(item, (*prefix, key))
    return frozenset(found)
