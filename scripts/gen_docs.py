#!/usr/bin/env python3
"""Generate the configuration reference and the README's generated tables from the code.

Sources, so that the documentation says exactly what the code does:

* :class:`kapsis.config.models.KapsisConfig` - every key of ``agent-sandbox.yaml`` (key path,
  type, default, description) and a complete example file holding the defaults;
* :data:`kapsis.sandbox.security.PROFILES` and ``DENIED_SYSCALLS`` - the security-profile table
  and the seccomp filter's denied syscalls;
* :class:`kapsis.errors.ExitCode` and the docstrings of the error classes - the exit-code table;
* :mod:`kapsis.k8s.crd` (from the ``AgentRequest`` models) - the Kubernetes CRD.

Outputs: ``docs/config-reference.md`` and ``deploy/crd.yaml`` (written whole) and the regions
of ``README.md`` between ``<!-- BEGIN GENERATED: NAME -->`` and ``<!-- END GENERATED: NAME -->``
for NAME in ``security-profiles`` and ``exit-codes`` (the rest of the README is left alone).

Usage::

    python scripts/gen_docs.py           # (re)write the generated files
    python scripts/gen_docs.py --check   # exit 1 if any generated file is out of date
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import re
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

ROOT = Path(__file__).resolve().parents[1]
# Document this checkout's models, not whatever copy of kapsis happens to be installed.
sys.path.insert(0, str(ROOT / "src"))

import annotated_types  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402
from ruamel.yaml import YAML  # noqa: E402

from kapsis import errors  # noqa: E402
from kapsis.config import agent_section, kubernetes_section, models  # noqa: E402
from kapsis.config.models import KapsisConfig  # noqa: E402
from kapsis.config.trust import marker  # noqa: E402
from kapsis.k8s.crd import crd_yaml  # noqa: E402
from kapsis.network.policy import category_names  # noqa: E402
from kapsis.sandbox.security import DENIED_SYSCALLS, PROFILES  # noqa: E402

REFERENCE = ROOT / "docs" / "config-reference.md"
README = ROOT / "README.md"
CRD = ROOT / "deploy" / "crd.yaml"
GENERATOR = "scripts/gen_docs.py"

# Named value types of models.py: (name, plural, what a value looks like).
NAMED_TYPES: tuple[tuple[Any, str, str, str], ...] = (
    (
        models.MemorySize,
        "size",
        "sizes",
        "a whole number with an optional unit `b`, `k`, `m` or `g` (powers of 1024), e.g. "
        "`512m`, `2g`; at least `6m`",
    ),
    (
        models.ByteSize,
        "byte size",
        "byte sizes",
        "a whole number with an optional unit `b`, `k`, `m` or `g` (powers of 1024), e.g. "
        "`100m`, `10g`; more than 0",
    ),
    (
        models.Duration,
        "duration",
        "durations",
        "a positive number of seconds, or a number with `s`, `m` or `h`, e.g. `90`, `45m`, `2h`",
    ),
    (
        models.EnvName,
        "variable name",
        "variable names",
        "an environment variable name (letters, digits, `_`, not starting with a digit); names "
        f"starting with `{models.RESERVED_ENV_PREFIX}` are reserved",
    ),
    (
        models.ProjectSubdir,
        "project folder",
        "project folders",
        "a relative path inside the project, e.g. `node_modules` or `web/node_modules`; no "
        "`..` and no `.git`",
    ),
    (
        models.HidePattern,
        "hide pattern",
        "hide patterns",
        "a line of a `.gitignore`, matched by git from the project's top: `*.pem`, `.aws/` (a "
        "folder), `/secrets` (at the top only), `!keep.pem` (an exception)",
    ),
    (
        models.HostPattern,
        "host pattern",
        "host patterns",
        "a host name, `*.domain` for any subdomain, or `name:port`",
    ),
    (
        models.AddressPattern,
        "address",
        "addresses",
        "an IPv4 or IPv6 address or network, optionally with a port: `203.0.113.7`, "
        "`10.0.0.0/8:5432`, `[2001:db8::1]:443`",
    ),
    (
        models.CategoryName,
        "category",
        "categories",
        "the name of a host list shipped with Kapsis: "
        + ", ".join(f"`{name}`" for name in category_names()),
    ),
    (
        models.IPAddress,
        "IP address",
        "IP addresses",
        "an IPv4 or IPv6 address",
    ),
    (
        models.Capability,
        "capability",
        "capabilities",
        "a Linux capability name, with or without the `CAP_` prefix, e.g. `CAP_CHOWN` or `chown`",
    ),
    (
        models.CommitTemplate,
        "commit template",
        "commit templates",
        "text with `{field}` placeholders: "
        + ", ".join(f"`{{{name}}}`" for name in sorted(models.COMMIT_MESSAGE_FIELDS))
        + "; write `{{` and `}}` for literal braces",
    ),
    (
        models.Identity,
        "identity",
        "identities",
        "a git identity, `Name <email>`",
    ),
    (
        models.KnownHostsLine,
        "known_hosts line",
        "known_hosts lines",
        "`HOST[,HOST...] TYPE BASE64` as in ssh's known_hosts, HOST a name, an address or "
        "`[HOST]:PORT`, e.g. `git.corp.example ssh-ed25519 AAAAC3...`",
    ),
    (
        models.MirrorUrl,
        "URL",
        "URLs",
        "an `http://` or `https://` URL without credentials in it",
    ),
    (
        kubernetes_section.NamespaceName,
        "namespace name",
        "namespace names",
        "a Kubernetes namespace name: lowercase letters, digits and `-`, at most 63",
    ),
    (
        kubernetes_section.ObjectName,
        "object name",
        "object names",
        "a Kubernetes object name: lowercase letters, digits, `-` and `.`",
    ),
    (
        models.CaBundle,
        "CA bundle",
        "CA bundles",
        "`host` (the bundle the host trusts) or the path of a PEM file",
    ),
    (
        agent_section.Endpoint,
        "endpoint URL",
        "endpoint URLs",
        "an `http://` or `https://` base URL with a host, no query, user or spaces, e.g. "
        "`https://llm.example.com/v1`",
    ),
    (
        agent_section.ModelName,
        "model name",
        "model names",
        "a model name: letters, digits and `._:/@+-`, at most 128, not starting with `-`",
    ),
    (
        models.SandboxPath,
        "absolute path",
        "absolute paths",
        "an absolute path inside the sandbox, e.g. `/workspace`",
    ),
)

PRIMITIVE_NAMES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    type(None): "null",
}

# Exit codes that no error class carries: what they mean.
EXIT_CODE_NOTES: dict[str, str] = {
    "SUCCESS": "Success: the agent ran and exited 0 (or the command did what was asked).",
    "INTERRUPTED": "Interrupted (Ctrl-C) while `kapsis run` waited in the foreground; the "
    "sandbox is stopped and removed. Also the status of a run whose supervising host process "
    "died (`error_type` `interrupted`, see [Status](#status)).",
}

REGION_RE = r"(<!-- BEGIN GENERATED: {name} -->\n)(.*?)(<!-- END GENERATED: {name} -->)"


class GenerationError(Exception):
    """The generator cannot do its job (e.g. a README marker is missing)."""


# ---------------------------------------------------------------------------------------------
# Walking the config models


@dataclass(frozen=True)
class Leaf:
    """One documented key of agent-sandbox.yaml."""

    path: str
    type_text: str
    default_text: str
    description: str
    trust_text: str


@dataclass(frozen=True)
class SectionDoc:
    """A mapping in agent-sandbox.yaml: its own keys and its nested sections."""

    path: str
    description: str
    leaves: tuple[Leaf, ...]
    children: tuple[SectionDoc, ...]


def _model_class(annotation: Any) -> type[BaseModel] | None:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _list_item_model(annotation: Any) -> type[BaseModel] | None:
    """The model of ``list[Model]`` (possibly optional), else None."""
    for candidate in (annotation, *_union_members(annotation)):
        if get_origin(candidate) is list:
            (item,) = get_args(candidate)
            return _model_class(item)
    return None


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return ()


def _named_type(annotation: Any, metadata: list[Any]) -> tuple[str, str] | None:
    """(singular, plural) name when the annotation is one of models.py's named types."""
    for alias, singular, plural, _ in NAMED_TYPES:
        alias_metadata = list(getattr(alias, "__metadata__", ()))
        if annotation == alias:
            return singular, plural
        if metadata and alias_metadata and all(item in metadata for item in alias_metadata):
            return singular, plural
    return None


def _plural(name: str) -> str:
    for _, singular, plural, _ in NAMED_TYPES:
        if name == singular:
            return plural
    if name.startswith("one of "):  # a list of Literal values: "list of github.com, ..."
        return name.removeprefix("one of ")
    return name + "s"


def type_text(annotation: Any, metadata: list[Any] | None = None) -> str:
    """A short human name for a field's type, e.g. ``size`` or ``list of host patterns``."""
    metadata = metadata or []
    named = _named_type(annotation, metadata)
    if named is not None:
        return named[0]
    members = _union_members(annotation)
    if members:
        parts = [type_text(m) for m in members if m is not type(None)]
        if len(parts) < len(members):
            parts.append("null")
        return " or ".join(parts)
    origin = get_origin(annotation)
    if origin is Literal:
        values = [f"`{v}`" for v in get_args(annotation)]
        if len(values) == 1:
            return values[0]
        return "one of " + ", ".join(values)
    if origin is list:
        (item,) = get_args(annotation)
        item_model = _model_class(item)
        if item_model is not None:
            return "list of mappings (" + ", ".join(item_model.model_fields) + ")"
        return "list of " + _plural(type_text(item))
    if origin is dict:
        key, value = get_args(annotation)
        return f"mapping of {type_text(key)} to {type_text(value)}"
    if annotation in PRIMITIVE_NAMES:
        return PRIMITIVE_NAMES[annotation]
    model = _model_class(annotation)
    if model is not None:
        return "mapping (" + ", ".join(model.model_fields) + ")"
    return str(annotation)


def constraint_text(metadata: list[Any]) -> str:
    bounds = []
    for item in metadata:
        if isinstance(item, annotated_types.Gt):
            bounds.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Ge):
            bounds.append(f">= {item.ge}")
        elif isinstance(item, annotated_types.Lt):
            bounds.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.Le):
            bounds.append(f"<= {item.le}")
    return f" ({', '.join(bounds)})" if bounds else ""


def default_value(info: FieldInfo) -> Any:
    """The field's default as plain data; PydanticUndefined when the key is required."""
    if info.default_factory is not None:
        factory: Callable[[], Any] = info.default_factory  # type: ignore[assignment]
        value = factory()
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def default_text(info: FieldInfo) -> str:
    value = default_value(info)
    if value is PydanticUndefined:
        return "required"
    return f"`{scalar_yaml(value) if not isinstance(value, list | dict) else json.dumps(value)}`"


# What each trust marker (kapsis.config.base) means for a project's own, untrusted file.
TRUST_TEXTS = {
    "free": "any value",
    "trust": "needs trust",
    "at_most": "no higher",
    "at_most_time": "no longer",
    "profile": "no profile that gets more",
    "subset": "no additions",
    "superset": "no removals",
}


def trust_text(rule: Any) -> str:
    if isinstance(rule, dict):
        order = " > ".join(f"`{scalar_yaml(value)}`" for value in rule["order"])
        return f"no wider ({order}, widest first)"
    # A key of a list's items: the list's own marker decides.
    return TRUST_TEXTS[rule] if rule is not None else "as the list"


def section_doc(model: type[BaseModel], path: str, description: str) -> SectionDoc:
    """Document ``model`` (found at key ``path``) and, recursively, its nested sections."""
    leaves: list[Leaf] = []
    children: list[SectionDoc] = []
    for name, info in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        nested = _model_class(info.annotation)
        if nested is not None:
            children.append(section_doc(nested, key, info.description or ""))
            continue
        leaves.append(
            Leaf(
                path=key,
                type_text=type_text(info.annotation, info.metadata)
                + constraint_text(info.metadata),
                default_text=default_text(info),
                description=info.description or "",
                trust_text=trust_text(marker(info)),
            )
        )
        item_model = _list_item_model(info.annotation)
        if item_model is not None:
            children.append(section_doc(item_model, f"{key}[]", f"Each item of `{key}`."))
    return SectionDoc(path, description, tuple(leaves), tuple(children))


def leaf_paths(section: SectionDoc) -> Iterator[str]:
    """Every documented key path, depth first."""
    for leaf in section.leaves:
        yield leaf.path
    for child in section.children:
        yield from leaf_paths(child)


# ---------------------------------------------------------------------------------------------
# The example file


_PLAIN_SCALAR_RE = re.compile(r"^[A-Za-z0-9/][A-Za-z0-9_./:@+-]*$")


def _reads_back_as(text: str, value: str) -> bool:
    """Whether YAML reads the plain scalar ``text`` as the string ``value`` (not a number etc.)."""
    loaded = YAML(typ="safe", pure=True).load(f"key: {text}\n")
    return isinstance(loaded, dict) and loaded.get("key") == value


def scalar_yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if _PLAIN_SCALAR_RE.match(value) and _reads_back_as(value, value):
            return value
        return json.dumps(value)
    raise GenerationError(f"cannot write {value!r} as a YAML scalar")


def example_yaml(model: type[BaseModel], indent: int = 0) -> list[str]:
    """The defaults of ``model`` as YAML lines, keys in declaration order."""
    lines: list[str] = []
    pad = "  " * indent
    for name, info in model.model_fields.items():
        nested = _model_class(info.annotation)
        if nested is not None:
            if indent == 0 and lines:
                lines.append("")
            lines.append(f"{pad}{name}:")
            lines += example_yaml(nested, indent + 1)
            continue
        value = default_value(info)
        if value is PydanticUndefined:
            raise GenerationError(f"{model.__name__}.{name} has no default to show")
        if isinstance(value, list) and value:
            lines.append(f"{pad}{name}:")
            lines += [f"{pad}  - {scalar_yaml(item)}" for item in value]
            continue
        if isinstance(value, dict) and value:
            raise GenerationError(f"{model.__name__}.{name}: non-empty mapping default")
        text = json.dumps(value) if isinstance(value, list | dict) else scalar_yaml(value)
        lines.append(f"{pad}{name}: {text}")
    return lines


def example_file() -> str:
    text = "\n".join(example_yaml(KapsisConfig)) + "\n"
    # The example must be a valid config that means exactly "the defaults".
    data = YAML(typ="safe", pure=True).load(text)
    if KapsisConfig.model_validate(data) != KapsisConfig():
        raise GenerationError("the generated example does not load back as the defaults")
    return text


# ---------------------------------------------------------------------------------------------
# Tables


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def security_profiles_table() -> str:
    header = [
        "profile",
        "summary",
        "capabilities",
        "no-new-privileges",
        "seccomp",
        "read-only root",
        "noexec /tmp",
        "pids limit",
        "needs LSM",
    ]
    rows = []
    for name, settings in PROFILES.items():
        rows.append(
            [
                f"`{name}`",
                settings.summary,
                "all dropped" if settings.drop_all_capabilities else "podman default",
                _yes_no(settings.no_new_privileges),
                "Kapsis filter" if settings.seccomp else "podman default",
                _yes_no(settings.read_only_root),
                _yes_no(settings.noexec_tmp),
                "podman default" if settings.pids_limit is None else str(settings.pids_limit),
                "yes (AppArmor)" if settings.requires_lsm else "no",
            ]
        )
    overrides = ", ".join(
        f"`security.overrides.{name}`" for name in models.SecurityOverrides.model_fields
    )
    note = (
        f"The default profile is `{models.SecuritySection().profile}`. Per-setting changes on "
        f"top of a profile: {overrides}; `resources.pids` replaces the pids limit.\n"
    )
    return table(header, rows) + "\n" + note


def error_classes() -> list[type[errors.KapsisError]]:
    """The error classes users can meet, in the order errors.py defines them."""
    found = []
    for value in vars(errors).values():
        if (
            inspect.isclass(value)
            and issubclass(value, errors.KapsisError)
            and value is not errors.KapsisError
        ):
            found.append(value)
    return found


def _first_paragraph(doc: str | None) -> str:
    text = inspect.cleandoc(doc or "").replace("``", "`")  # reST literals -> Markdown
    return " ".join(text.split("\n\n")[0].split())


def exit_codes_table() -> str:
    header = ["exit code", "`ExitCode`", "error class", "meaning"]
    rows = []
    classes = error_classes()
    for code in errors.ExitCode:
        carriers = [cls for cls in classes if cls.exit_code == code]
        if not carriers:
            if code.name not in EXIT_CODE_NOTES:
                raise GenerationError(
                    f"ExitCode.{code.name} has no error class and no note in {GENERATOR}"
                )
            rows.append([str(int(code)), code.name, "-", EXIT_CODE_NOTES[code.name]])
            continue
        for cls in carriers:
            parent = cls.__mro__[1]
            name = f"`{cls.__name__}`"
            if parent is not errors.KapsisError:
                name += f" (a `{parent.__name__}`)"
            rows.append([str(int(code)), code.name, name, _first_paragraph(cls.__doc__)])
    note = (
        "Every error class derives from `KapsisError`; the CLI prints its message as one line "
        "(`kapsis: error: ...`) on stderr and exits with its code.\n"
    )
    return table(header, rows) + "\n" + note


# ---------------------------------------------------------------------------------------------
# config-reference.md


def _render_section(section: SectionDoc, level: int) -> list[str]:
    out = [f"{'#' * level} `{section.path}`", ""]
    if section.description:
        out += [section.description, ""]
    if section.leaves:
        rows = [
            [
                f"`{leaf.path}`",
                leaf.type_text,
                leaf.default_text,
                leaf.trust_text,
                leaf.description,
            ]
            for leaf in section.leaves
        ]
        out += [table(["key", "type", "default", "untrusted file may set", "description"], rows)]
    for child in section.children:
        out += _render_section(child, min(level + 1, 4))
    return out


def reference_markdown() -> str:
    top = section_doc(KapsisConfig, "", "")
    named_rows = [[f"{singular}", meaning] for _, singular, _, meaning in NAMED_TYPES]
    denied = ", ".join(f"`{name}`" for name in DENIED_SYSCALLS)
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated by {GENERATOR} from the code; do not edit by hand. "
        f"Regenerate with `python {GENERATOR}`. -->",
        "",
        "Every key of `agent-sandbox.yaml`, generated from the pydantic models in "
        "`src/kapsis/config/models.py`, which are also what validates the files. Where the files "
        "are read from and how they merge is in the README's *Configuration* section; "
        "`kapsis config schema` prints the same keys as a JSON Schema for editors, and "
        "`kapsis config show PROJECT` shows the effective values and where each one came from.",
        "",
        'Unknown keys are errors. `null` means "not set": the agent profile or the security '
        "profile decides.",
        "",
        "## Trust",
        "",
        "A project's own `agent-sandbox.yaml` and `.kapsis/config.yaml` (and `./agent-sandbox.yaml`"
        " in the current folder) are files an agent can edit, so they are untrusted until you "
        "review them and run `kapsis trust PROJECT`, which records their content hashes in "
        "`~/.config/kapsis/trusted.json`; a trusted file that changes by one byte is untrusted "
        "again. Flags, `--config FILE` and your own `~/.config/kapsis/config.yaml` are trusted. "
        "The column *untrusted file may set* says what a value from an untrusted file may do, "
        "compared with what the trusted sources alone give (your default): *any value*; *no "
        "higher* / *no longer* (a limit at most yours; none means no limit); *no profile that "
        "gets more* (an agent profile that gets no host secret and no API host yours does not); "
        "*no additions* (only items your "
        "default already holds: for `network.allowlist.hosts` also the agent profile's hosts and "
        "those of your categories); *no removals* (nor an added `!` exception); *no wider* "
        "(an order of values); *needs "
        "trust* (any value but yours). A run whose untrusted file goes further stops before "
        "anything is created, exit 2, naming the file, line and key (`kapsis config show` marks "
        "each value trusted or not; `kapsis trust --list` / `--revoke` manage the records).",
        "",
        "## Value types",
        "",
        table(["type", "what a value looks like"], named_rows),
    ]
    for child in top.children:
        out += _render_section(child, 2)
    out += [
        "## Complete example (the defaults)",
        "",
        "A file with every key set to its default; a real file only needs the keys it changes.",
        "",
        "```yaml",
        "# agent-sandbox.yaml",
        example_file().rstrip("\n"),
        "```",
        "",
        "## Security profiles",
        "",
        security_profiles_table(),
        "### Seccomp filter",
        "",
        "With `seccomp` on, the agent runs under the Kapsis filter: the host's container default "
        "(`/usr/share/containers/seccomp.json`, when present) minus the syscalls below, which fail "
        "with `EPERM`. `clone` is allowed only without namespace flags, and `clone3` fails with "
        "`ENOSYS` (libc falls back to `clone`).",
        "",
        denied,
        "",
        "## Exit codes",
        "",
        exit_codes_table().rstrip("\n"),
        "",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# README regions


def readme_regions() -> dict[str, str]:
    return {
        "security-profiles": security_profiles_table(),
        "exit-codes": exit_codes_table(),
    }


def replace_region(text: str, name: str, body: str) -> str:
    pattern = re.compile(REGION_RE.format(name=re.escape(name)), re.DOTALL)
    matches = pattern.findall(text)
    if len(matches) != 1:
        raise GenerationError(
            f"README.md: expected one <!-- BEGIN GENERATED: {name} --> ... "
            f"<!-- END GENERATED: {name} --> region, found {len(matches)}"
        )
    note = f"<!-- generated by {GENERATOR}; do not edit this region by hand -->\n"
    return pattern.sub(lambda m: m.group(1) + note + "\n" + body + "\n" + m.group(3), text)


def readme_text(current: str) -> str:
    for name, body in readme_regions().items():
        current = replace_region(current, name, body)
    return current


# ---------------------------------------------------------------------------------------------
# main


def expected_files() -> dict[Path, str]:
    """Each generated file and the content it should have."""
    if not README.is_file():
        raise GenerationError(f"{README} does not exist; it must hold the generated regions")
    return {
        REFERENCE: reference_markdown(),
        README: readme_text(README.read_text(encoding="utf-8")),
        CRD: crd_yaml(),
    }


def _diff(path: Path, current: str, expected: str, limit: int = 40) -> str:
    lines = list(
        difflib.unified_diff(
            current.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            fromfile=f"{path.relative_to(ROOT)} (on disk)",
            tofile=f"{path.relative_to(ROOT)} (generated)",
        )
    )
    shown = "".join(lines[:limit])
    return shown + (f"... ({len(lines) - limit} more diff lines)\n" if len(lines) > limit else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if any generated file is out of date",
    )
    args = parser.parse_args(argv)
    try:
        files = expected_files()
    except GenerationError as error:
        print(f"gen_docs: error: {error}", file=sys.stderr)
        return 1
    stale = []
    for path, expected in files.items():
        current = path.read_text(encoding="utf-8") if path.is_file() else ""
        if current == expected:
            continue
        stale.append(path)
        if args.check:
            print(_diff(path, current, expected), file=sys.stderr, end="")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(expected, encoding="utf-8")
    names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
    if args.check:
        if stale:
            print(f"gen_docs: out of date: {names}; run `python {GENERATOR}`", file=sys.stderr)
            return 1
        return 0
    print(f"gen_docs: wrote {names}" if stale else "gen_docs: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
