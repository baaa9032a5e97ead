"""Config loading: precedence, merging, origins, one-line errors, and the value validators."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from kapsis.config.loader import load_config
from kapsis.config.models import (
    EnvironmentSection,
    KapsisConfig,
    NetworkSection,
    ResourcesSection,
    duration_to_seconds,
    memory_to_bytes,
)
from kapsis.errors import ConfigError, ExitCode

# ---------------------------------------------------------------------------------------------
# precedence


# Sources, highest precedence first; each sets resources.memory to its own value.
SOURCES = ["flag", "explicit", "cwd", "project", "project_kapsis", "user"]
MEMORY = {name: f"{index + 1}00m" for index, name in enumerate(SOURCES)}


def _write_sources(present: list[str], project: Path, tmp_path: Path, config_dir: Path):
    """Write the file sources in ``present``; return (--config path, flags)."""
    files = {
        "cwd": Path.cwd() / "agent-sandbox.yaml",
        "project": project / "agent-sandbox.yaml",
        "project_kapsis": project / ".kapsis" / "config.yaml",
        "user": config_dir / "config.yaml",
        "explicit": tmp_path / "explicit.yaml",
    }
    for name in present:
        if name in files:
            files[name].parent.mkdir(parents=True, exist_ok=True)
            files[name].write_text(f"resources:\n  memory: {MEMORY[name]}\n")
    explicit = files["explicit"] if "explicit" in present else None
    flags = {"resources.memory": ("--memory", MEMORY["flag"])} if "flag" in present else {}
    return explicit, flags, files


@pytest.mark.parametrize("winner", SOURCES)
def test_highest_present_source_wins(winner, project, tmp_path, config_dir):
    present = SOURCES[SOURCES.index(winner) :]
    explicit, flags, _ = _write_sources(present, project, tmp_path, config_dir)

    loaded = load_config(project, explicit, flags)

    assert loaded.config.resources.memory == MEMORY[winner]


@pytest.mark.parametrize("winner", [s for s in SOURCES if s != "flag"])
def test_origin_names_the_winning_file_and_line(winner, project, tmp_path, config_dir):
    present = SOURCES[SOURCES.index(winner) :]
    explicit, flags, files = _write_sources(present, project, tmp_path, config_dir)

    loaded = load_config(project, explicit, flags)

    assert str(loaded.origin_of(("resources", "memory"))) == f"{files[winner]}:2"


def test_origin_of_a_flag_names_the_flag(project):
    loaded = load_config(project, None, {"resources.memory": ("--memory", "3g")})

    assert str(loaded.origin_of(("resources", "memory"))) == "flag --memory"


def test_origin_of_an_untouched_value_is_default(project):
    loaded = load_config(project)

    assert str(loaded.origin_of(("git", "branch"))) == "default"


def test_origin_of_a_default_next_to_a_file_value_is_default(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("resources:\n  memory: 2g\n")

    loaded = load_config(None, config)

    assert str(loaded.origin_of(("resources", "cpus"))) == "default"


def test_origin_of_a_default_next_to_a_flag_value_is_default():
    loaded = load_config(None, None, {"resources.memory": ("--memory", "2g")})

    assert str(loaded.origin_of(("resources", "cpus"))) == "default"


def test_flags_with_value_none_do_not_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("resources:\n  memory: 2g\n")

    loaded = load_config(None, config, {"resources.memory": ("--memory", None)})

    assert loaded.config.resources.memory == "2g"


def test_defaults_apply_without_any_source():
    loaded = load_config(None)

    assert loaded.config == KapsisConfig()
    assert loaded.files == ()


def test_loaded_files_are_listed_highest_first_and_once_when_cwd_is_project(
    project, config_dir, monkeypatch
):
    (project / "agent-sandbox.yaml").write_text("git:\n  branch: a\n")
    (config_dir / "config.yaml").write_text("git:\n  branch: b\n")
    monkeypatch.chdir(project)

    loaded = load_config(project)

    assert [p.resolve() for p in loaded.files] == [
        (project / "agent-sandbox.yaml").resolve(),
        (config_dir / "config.yaml").resolve(),
    ]


# ---------------------------------------------------------------------------------------------
# merging


def test_mappings_merge_key_by_key(project, config_dir):
    (config_dir / "config.yaml").write_text("resources:\n  memory: 1g\n  cpus: 3\n")
    (project / "agent-sandbox.yaml").write_text("resources:\n  memory: 2g\n")

    loaded = load_config(project)

    assert loaded.config.resources.memory == "2g"
    assert loaded.config.resources.cpus == 3.0
    assert str(loaded.origin_of(("resources", "cpus"))) == f"{config_dir / 'config.yaml'}:3"


def test_lists_are_replaced_whole(project, config_dir):
    (config_dir / "config.yaml").write_text(
        "network:\n  allowlist:\n    hosts: [a.example.com, b.example.com]\n"
    )
    (project / "agent-sandbox.yaml").write_text(
        "network:\n  allowlist:\n    hosts:\n      - c.example.com\n"
    )

    loaded = load_config(project)

    assert loaded.config.network.allowlist.hosts == ["c.example.com"]
    origin = loaded.origin_of(("network", "allowlist", "hosts", 0))
    assert str(origin) == f"{project / 'agent-sandbox.yaml'}:4"


def test_nested_mappings_merge_across_three_levels(project, config_dir, tmp_path):
    (config_dir / "config.yaml").write_text("security:\n  overrides:\n    seccomp: false\n")
    explicit = tmp_path / "x.yaml"
    explicit.write_text("security:\n  overrides:\n    read_only_root: true\n")

    loaded = load_config(project, explicit)

    overrides = loaded.config.security.overrides
    assert overrides.seccomp is False
    assert overrides.read_only_root is True


# ---------------------------------------------------------------------------------------------
# one-line errors


def _load_error(tmp_path: Path, text: str) -> tuple[ConfigError, Path]:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(None, config)
    return caught.value, config


def _assert_one_line_usage_error(error: ConfigError) -> str:
    message = str(error)
    assert "\n" not in message
    assert error.exit_code == ExitCode.USAGE == 2
    return message


def test_unknown_key_names_file_line_path_and_allowed_keys(tmp_path):
    error, config = _load_error(tmp_path, "# comment\nresources:\n  memory: 2g\n  memroy: 3g\n")

    message = _assert_one_line_usage_error(error)

    assert message.startswith(f"{config}:4: resources.memroy: unknown key 'memroy'; allowed here: ")
    assert message.endswith("cpus, disk, idle_action, idle_timeout, memory, pids, timeout")


def test_unknown_top_level_section_lists_the_sections(tmp_path):
    error, config = _load_error(tmp_path, "resource:\n  memory: 2g\n")

    message = _assert_one_line_usage_error(error)

    assert message.startswith(f"{config}:1: resource: unknown key 'resource'; allowed here: ")
    for section in ("agent", "resources", "security", "network", "filesystem", "audit"):
        assert section in message


def test_unknown_key_inside_a_list_item_lists_the_item_fields(tmp_path):
    error, config = _load_error(
        tmp_path, "filesystem:\n  mounts:\n    - source: /etc\n      target: /x\n      mode: rw\n"
    )

    message = _assert_one_line_usage_error(error)

    assert message == (
        f"{config}:5: filesystem.mounts[0].mode: unknown key 'mode'; allowed here: source, target"
    )


def test_wrong_type_names_file_line_and_what_is_expected(tmp_path):
    error, config = _load_error(tmp_path, "resources:\n  cpus: lots\n")

    message = _assert_one_line_usage_error(error)

    assert message.startswith(f"{config}:2: resources.cpus: ")
    assert "valid number" in message
    assert "CPU limit" in message


def test_bad_literal_lists_the_allowed_values(tmp_path):
    error, config = _load_error(tmp_path, "network:\n  mode: wide-open\n")

    message = _assert_one_line_usage_error(error)

    assert message.startswith(f"{config}:2: network.mode: ")
    for allowed in ("'none'", "'open'", "'filtered'"):
        assert allowed in message


def test_bad_security_profile_lists_the_profiles(tmp_path):
    error, config = _load_error(tmp_path, "security:\n  profile: lax\n")

    message = _assert_one_line_usage_error(error)

    assert message.startswith(f"{config}:2: security.profile: ")
    for allowed in ("minimal", "standard", "strict", "paranoid"):
        assert allowed in message


def test_invalid_yaml_names_file_and_line(tmp_path):
    error, config = _load_error(tmp_path, "resources:\n  memory: 2g\n   cpus: 2\n")

    message = _assert_one_line_usage_error(error)

    assert re.match(rf"^{re.escape(str(config))}:3: invalid YAML: ", message)


def test_non_mapping_document_is_rejected(tmp_path):
    error, config = _load_error(tmp_path, "- resources\n- network\n")

    message = _assert_one_line_usage_error(error)

    assert message.startswith(f"{config}:1: ")
    assert "mapping" in message


def test_missing_config_file_is_a_usage_error(tmp_path):
    missing = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError) as caught:
        load_config(None, missing)

    message = _assert_one_line_usage_error(caught.value)
    assert message.startswith(f"--config {missing}: no such file")


def test_a_flag_error_names_the_flag(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(None, None, {"network.mode": ("--network-mode", "wide")})

    message = _assert_one_line_usage_error(caught.value)
    assert message.startswith("flag --network-mode: network.mode: ")


def test_empty_config_file_means_defaults(tmp_path):
    config = tmp_path / "empty.yaml"
    config.write_text("# nothing yet\n")

    loaded = load_config(None, config)

    assert loaded.config == KapsisConfig()


def test_values_are_plain_python_types(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("resources:\n  cpus: 1.5\naudit:\n  enabled: false\n")

    loaded = load_config(None, config)

    assert type(loaded.config.resources.cpus) is float
    assert loaded.config.resources.cpus == 1.5
    assert loaded.config.audit.enabled is False


# ---------------------------------------------------------------------------------------------
# value parsing and validation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512", 512),
        ("512b", 512),
        ("64k", 64 * 1024),
        ("512m", 512 * 1024**2),
        ("2g", 2 * 1024**3),
        ("2G", 2 * 1024**3),
        (" 1g ", 1024**3),
    ],
)
def test_memory_to_bytes(text, expected):
    assert memory_to_bytes(text) == expected


@pytest.mark.parametrize("text", ["1.5g", "2gb", "g", "-1m", "lots", ""])
def test_memory_to_bytes_rejects_non_sizes(text):
    with pytest.raises(ValueError, match="not a size"):
        memory_to_bytes(text)


def test_memory_below_podman_minimum_is_rejected():
    with pytest.raises(ValidationError, match="at least 6m"):
        ResourcesSection(memory="5m")


def test_memory_is_normalised_to_lower_case():
    assert ResourcesSection(memory="2G").memory == "2g"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(45, 45), ("45", 45), ("30s", 30), ("30m", 1800), ("2h", 7200), ("1H", 3600)],
)
def test_duration_to_seconds(value, expected):
    assert duration_to_seconds(value) == expected


@pytest.mark.parametrize("value", ["1d", "1.5h", "soon", "-5"])
def test_duration_rejects_non_durations(value):
    with pytest.raises(ValueError, match="not a duration"):
        duration_to_seconds(value)


def test_zero_timeout_is_rejected():
    with pytest.raises(ValidationError, match="positive"):
        ResourcesSection(timeout="0m")


@pytest.mark.parametrize("name", ["PATH", "_x", "My_Var2"])
def test_valid_env_names_are_accepted(name):
    section = EnvironmentSection(passthrough=[name], set={name: "v"})

    assert section.passthrough == [name]
    assert section.set == {name: "v"}


@pytest.mark.parametrize("name", ["1ABC", "MY-VAR", "A B", ""])
def test_invalid_env_names_are_rejected(name):
    with pytest.raises(ValidationError, match="not an environment variable name"):
        EnvironmentSection(passthrough=[name])


@pytest.mark.parametrize("field", ["passthrough", "set"])
def test_reserved_kapsis_prefix_is_rejected(field):
    value = ["KAPSIS_TASK"] if field == "passthrough" else {"KAPSIS_TASK": "x"}

    with pytest.raises(ValidationError, match="reserved"):
        EnvironmentSection(**{field: value})


def test_reserved_prefix_in_a_file_is_a_one_line_error(tmp_path):
    error, config = _load_error(tmp_path, "environment:\n  passthrough:\n    - KAPSIS_AGENT_ID\n")

    message = _assert_one_line_usage_error(error)

    assert message.startswith(f"{config}:3: environment.passthrough[0]: ")
    assert "reserved" in message


@pytest.mark.parametrize(
    ("host", "stored"),
    [
        ("api.openai.com", "api.openai.com"),
        ("*.github.com", "*.github.com"),
        ("localhost:8080", "localhost:8080"),
        ("API.Example.COM", "api.example.com"),
    ],
)
def test_valid_host_patterns(host, stored):
    section = NetworkSection(allowlist={"hosts": [host]})

    assert section.allowlist.hosts == [stored]


@pytest.mark.parametrize(
    "host", ["https://api.openai.com", "*.", "*", "a..b", "-bad.com", "a b.com", "x.com/path"]
)
def test_invalid_host_patterns_are_rejected(host):
    with pytest.raises(ValidationError, match="not a host name"):
        NetworkSection(allowlist={"hosts": [host]})


@pytest.mark.parametrize(
    ("given", "stored"), [("chown", "CAP_CHOWN"), ("CAP_NET_RAW", "CAP_NET_RAW")]
)
def test_capabilities_are_normalised(given, stored):
    config = KapsisConfig.model_validate({"security": {"overrides": {"cap_add": [given]}}})

    assert config.security.overrides.cap_add == [stored]


def test_mount_target_must_be_absolute():
    with pytest.raises(ValidationError, match="absolute path"):
        KapsisConfig.model_validate(
            {"filesystem": {"mounts": [{"source": "/etc", "target": "relative"}]}}
        )
