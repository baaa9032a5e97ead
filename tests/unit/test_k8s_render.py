"""Rendering an AgentRequest: valid Kubernetes objects with exactly the intended security."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from kapsis.agents.profiles import find_profile
from kapsis.errors import ConfigError
from kapsis.k8s.layout import FINISHER_UID, StepConfig
from kapsis.k8s.names import (
    AGENT_CONTAINER,
    CLONE_CONTAINER,
    FINISHER_CONTAINER,
    GATEWAY_CONTAINER,
    REQUEST_LABEL,
)
from kapsis.k8s.render import RenderedRequest, command_argv, render_request
from kapsis.k8s.resource import AgentRequestSpec
from kapsis.k8s.settings import KUBERNETES_VERSION, OperatorSettings
from kapsis.network.firewall import nft_ruleset
from kapsis.network.gateway_config import gateway_config_files
from kapsis.network.gateway_files import gateway_scripts
from kapsis.network.policy import PolicyBuilder

SETTINGS = OperatorSettings(dns_servers=("10.96.0.10",))
PROFILES = ("minimal", "standard", "strict", "paranoid")
MODES = ("none", "filtered", "open")


def _spec(**overrides: Any) -> AgentRequestSpec:
    data: dict[str, Any] = {
        "agent": {"profile": "shell"},
        "task": {"inline": "add a README"},
        "workspace": {
            "git": {"url": "https://git.example.com/team/repo.git", "credentialsSecret": "creds"}
        },
        "network": {"mode": "filtered", "allowlist": {"hosts": ["pypi.org"]}},
        "environment": {
            "set": {"LANG": "C.UTF-8"},
            "secrets": {"API_KEY": {"name": "api", "key": "key"}},
        },
    }
    for key, value in overrides.items():
        data[key] = value
    return AgentRequestSpec.model_validate(data)


def _render(spec: AgentRequestSpec, settings: OperatorSettings = SETTINGS) -> RenderedRequest:
    return render_request("fix-readme", "team", "0000-1111", spec, settings)


def _containers(rendered: RenderedRequest) -> dict[str, dict[str, Any]]:
    spec = rendered.pod["spec"]
    return {c["name"]: c for c in [*spec["initContainers"], *spec["containers"]]}


def _volume_kinds(rendered: RenderedRequest) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in rendered.pod["spec"]["volumes"]}


@pytest.mark.parametrize(("profile", "mode"), list(itertools.product(PROFILES, MODES)))
def test_every_rendered_object_validates(profile: str, mode: str) -> None:
    spec = _spec(security={"profile": profile}, network={"mode": mode})
    rendered = _render(spec)
    for item in rendered.objects():
        kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)


def test_validation_is_not_a_rubber_stamp() -> None:
    pod = _render(_spec()).pod
    pod["spec"]["containers"][0]["securityContext"]["runAsUsr"] = 0
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_pod_contract() -> None:
    rendered = _render(_spec())
    spec = rendered.pod["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert [c["name"] for c in spec["initContainers"]] == [CLONE_CONTAINER, GATEWAY_CONTAINER]
    assert [c["name"] for c in spec["containers"]] == [AGENT_CONTAINER, FINISHER_CONTAINER]
    gateway = _containers(rendered)[GATEWAY_CONTAINER]
    assert gateway["restartPolicy"] == "Always"  # a native sidecar
    assert "selftest" in " ".join(gateway["startupProbe"]["exec"]["command"])
    finisher = _containers(rendered)[FINISHER_CONTAINER]
    assert finisher["terminationMessagePath"] == "/dev/termination-log"
    assert rendered.pod["metadata"]["labels"][REQUEST_LABEL] == "fix-readme"


def test_every_object_is_owned_by_the_request() -> None:
    for item in _render(_spec()).objects():
        (owner,) = item["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "kapsis.dev/v1alpha1",
            "kind": "AgentRequest",
            "name": "fix-readme",
            "uid": "0000-1111",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert item["metadata"]["namespace"] == "team"


EXPECTED = {
    # profile: (readOnlyRootFilesystem, AppArmor profile)
    "minimal": (False, None),
    "standard": (False, None),
    "strict": (True, None),
    "paranoid": (True, {"type": "Localhost", "localhostProfile": "kapsis-agent"}),
}


@pytest.mark.parametrize("profile", PROFILES)
def test_agent_security_context_per_profile(profile: str) -> None:
    settings = OperatorSettings(dns_servers=("10.96.0.10",), seccomp="Localhost")
    agent = _containers(_render(_spec(security={"profile": profile}), settings))[AGENT_CONTAINER]
    context = agent["securityContext"]
    read_only, apparmor = EXPECTED[profile]
    assert context["runAsUser"] == 1000
    assert context["runAsNonRoot"] is True
    assert context["privileged"] is False
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["readOnlyRootFilesystem"] is read_only
    assert context.get("appArmorProfile") == apparmor
    # The Kapsis filter (a Localhost profile) wherever the local profile applies it.
    expected_seccomp = (
        {"type": "RuntimeDefault"}
        if profile == "minimal"
        else {"type": "Localhost", "localhostProfile": "kapsis/agent.json"}
    )
    assert context["seccompProfile"] == expected_seccomp


def test_overrides_and_capabilities() -> None:
    spec = _spec(
        security={
            "profile": "standard",
            "overrides": {"read_only_root": True, "cap_add": ["chown"]},
        }
    )
    context = _containers(_render(spec))[AGENT_CONTAINER]["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}


@pytest.mark.parametrize("capability", ["NET_ADMIN", "SETUID", "CAP_SYS_ADMIN", "NET_RAW"])
def test_agent_cannot_get_capabilities_that_pass_the_gateway(capability: str) -> None:
    spec = _spec(security={"overrides": {"cap_add": [capability]}})
    with pytest.raises(ConfigError, match="cap_add"):
        _render(spec)


@pytest.mark.parametrize(("profile", "mode"), list(itertools.product(PROFILES, MODES)))
def test_only_the_gateway_has_net_admin(profile: str, mode: str) -> None:
    rendered = _render(_spec(security={"profile": profile}, network={"mode": mode}))
    holders = [
        name
        for name, container in _containers(rendered).items()
        if "NET_ADMIN" in container["securityContext"]["capabilities"].get("add", [])
    ]
    assert holders == ([] if mode == "open" else [GATEWAY_CONTAINER])
    for container in _containers(rendered).values():
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


def _mounted_volumes(container: dict[str, Any]) -> set[str]:
    return {mount["name"] for mount in container.get("volumeMounts", [])}


def test_agent_never_mounts_the_credentials_or_a_token() -> None:
    rendered = _render(_spec())
    volumes = _volume_kinds(rendered)
    containers = _containers(rendered)
    secret_volumes = {name for name, v in volumes.items() if "secret" in v}
    token_volumes = {name for name, v in volumes.items() if "projected" in v}
    # Control: the Secret is there, and the steps that need it do mount it.
    assert volumes["credentials"]["secret"]["secretName"] == "creds"
    assert "credentials" in _mounted_volumes(containers[CLONE_CONTAINER])
    assert "credentials" in _mounted_volumes(containers[FINISHER_CONTAINER])
    agent = containers[AGENT_CONTAINER]
    assert not _mounted_volumes(agent) & (secret_volumes | token_volumes)
    assert not _mounted_volumes(agent) & {"pod-info", "kapsis-repo", "gateway-config"}
    assert not any(m["mountPath"].startswith("/var/run/secrets") for m in agent["volumeMounts"])
    assert rendered.pod["spec"]["automountServiceAccountToken"] is False
    # The agent's only Secret values: the variables the request lists under secrets.
    refs = [e for e in agent["env"] if "valueFrom" in e]
    assert refs == [
        {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "api", "key": "key"}}}
    ]
    for name in (CLONE_CONTAINER, GATEWAY_CONTAINER, FINISHER_CONTAINER):
        assert not any("valueFrom" in e for e in containers[name].get("env", []))


def test_the_finisher_alone_sees_the_annotations_and_reads_the_workspace_read_only() -> None:
    containers = _containers(_render(_spec()))
    seeing = [n for n, c in containers.items() if "pod-info" in _mounted_volumes(c)]
    assert seeing == [FINISHER_CONTAINER]
    finisher = containers[FINISHER_CONTAINER]
    workspace = next(m for m in finisher["volumeMounts"] if m["name"] == "workspace")
    assert workspace["readOnly"] is True
    assert finisher["securityContext"]["runAsUser"] == FINISHER_UID


def test_resources_and_workspace_limits() -> None:
    spec = _spec(resources={"memory": "512m", "cpus": 1.5, "workspaceSize": "2g"})
    rendered = _render(spec)
    agent = _containers(rendered)[AGENT_CONTAINER]
    assert agent["resources"]["limits"] == {"memory": "512Mi", "cpu": "1500m"}
    assert _volume_kinds(rendered)["workspace"]["emptyDir"] == {"sizeLimit": "2Gi"}
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts["/workspace"]["name"] == "workspace"
    assert mounts["/task-spec.md"]["readOnly"] is True


def test_timeout_wraps_the_agent_and_bounds_the_pod() -> None:
    rendered = _render(_spec(resources={"timeout": "10m"}))
    command = _containers(rendered)[AGENT_CONTAINER]["command"]
    assert command[:3] == ["timeout", "--kill-after=30s", "600s"]
    assert command[3:] == list(command_argv(_spec(), find_profile("shell")))
    assert rendered.pod["spec"]["activeDeadlineSeconds"] == 600 + 3600
    # The default limit (2h) bounds the pod too; only an explicit null leaves it unbounded.
    assert _render(_spec()).pod["spec"]["activeDeadlineSeconds"] == 7200 + 3600
    assert "activeDeadlineSeconds" not in _render(_spec(resources={"timeout": None})).pod["spec"]


def test_dns_goes_to_the_gateway_unless_open() -> None:
    for mode in ("none", "filtered"):
        spec = _render(_spec(network={"mode": mode})).pod["spec"]
        assert spec["dnsPolicy"] == "None"
        assert spec["dnsConfig"]["nameservers"] == ["127.0.0.1"]
    spec = _render(_spec(network={"mode": "open"})).pod["spec"]
    assert "dnsPolicy" not in spec
    assert GATEWAY_CONTAINER not in [c["name"] for c in spec["initContainers"]]


def test_network_policy_per_mode() -> None:
    def egress(mode: str, **network: Any) -> list[dict[str, Any]]:
        policy = _render(_spec(network={"mode": mode, **network})).network_policy
        assert policy["spec"]["ingress"] == []
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        assert policy["spec"]["podSelector"]["matchLabels"][REQUEST_LABEL] == "fix-readme"
        rules: list[dict[str, Any]] = policy["spec"]["egress"]
        return rules

    assert egress("open") == [{}]
    dns, git, *rest = egress("none")
    assert {p["port"] for p in dns["ports"]} == {53}
    assert git == {"ports": [{"protocol": "TCP", "port": 443}]}
    assert rest == []  # none: nothing but DNS and the git remote (for clone and finisher)
    filtered = egress(
        "filtered",
        allowlist={"hosts": ["pypi.org", "mirror.example:8443"], "addresses": ["10.1.0.0/16:5432"]},
    )
    assert filtered[2] == {
        "ports": [{"protocol": "TCP", "port": p} for p in (80, 443, 8443)],
    }
    assert filtered[3] == {
        "to": [{"ipBlock": {"cidr": "10.1.0.0/16"}}],
        "ports": [{"protocol": "TCP", "port": 5432}],
    }


def test_gateway_files_are_the_podman_gateways() -> None:
    spec = _spec(workspace={"git": {"url": "https://git.example.com/r.git", "push": False}})
    files = next(c for c in _render(spec).config_maps if c["metadata"]["name"].endswith("gateway"))
    builder = PolicyBuilder("filtered")
    builder.add_host("pypi.org", "test")
    policy = builder.build(("10.96.0.10",))
    # The very files a Podman gateway gets for the same policy, byte for byte.
    assert files["data"] == gateway_config_files(policy, ["10.96.0.10"]) | gateway_scripts()
    assert files["data"]["rules.nft"] == nft_ruleset(policy, ["10.96.0.10"])
    assert set(files["data"]) >= {
        "rules.nft",
        "dnsmasq.conf",
        "dnsdist.conf",
        "haproxy.cfg",
        "proxy-443.names",
        "probe-address",
        "proxy-ports",
        "entrypoint.sh",
        "selftest.py",
        "report.py",
        "observe.py",
    }


def test_push_opens_the_remote_port_to_the_finisher_uid_only() -> None:
    files = next(
        c for c in _render(_spec()).config_maps if c["metadata"]["name"].endswith("gateway")
    )
    rules = files["data"]["rules.nft"]
    assert f"meta skuid {FINISHER_UID} tcp dport 443 ct mark set 16 accept" in rules
    # Its flows are its own: no other uid sends on them, and the proxy never takes them over.
    assert f"ct mark 16 meta skuid != {FINISHER_UID} drop" in rules
    assert f"meta skuid {{ 990, 991, 992, {FINISHER_UID} }} return" in rules
    assert "skuid 1000" not in rules
    dnsmasq = files["data"]["dnsmasq.conf"]
    # Resolvable for the finisher, but never filed into an allow set the agent could use.
    assert "server=/git.example.com/10.96.0.10" in dnsmasq
    assert "nftset=/git.example.com/" not in dnsmasq
    # mode none: nothing but that.
    none = next(
        c
        for c in _render(_spec(network={"mode": "none"})).config_maps
        if c["metadata"]["name"].endswith("gateway")
    )
    assert "nftset" not in none["data"]["dnsmasq.conf"]
    assert "pypi.org" not in none["data"]["dnsmasq.conf"]


def test_the_pods_uids_are_none_of_the_gateways() -> None:
    """The firewall knows the gateway's daemons by uid: on a cluster every container of the Pod
    shares the network namespace, so the agent's and the finisher's uids must differ from them
    (a finisher with the proxy's uid could reach every allowlisted name's address)."""
    from kapsis.k8s.layout import AGENT_UID
    from kapsis.network.gateway_layout import GATEWAY_UIDS

    assert FINISHER_UID not in GATEWAY_UIDS and AGENT_UID not in GATEWAY_UIDS
    builder = PolicyBuilder("filtered")
    with pytest.raises(ValueError, match="one of the gateway's own"):
        nft_ruleset(builder.build(("10.96.0.10",)), ["10.96.0.10"], {GATEWAY_UIDS[1]: (443,)})


def test_refusals_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"spec\.agent\.image"):
        _render(_spec(agent={"image": "docker.io/library/python:3"}))
    with pytest.raises(ConfigError, match=r"spec\.environment\.set\.HOME"):
        _render(_spec(environment={"set": {"HOME": "/root"}}))
    with pytest.raises(ConfigError, match="both set and secrets"):
        _render(
            _spec(
                environment={
                    "set": {"TOKEN": "x"},
                    "secrets": {"TOKEN": {"name": "s", "key": "k"}},
                }
            )
        )
    with pytest.raises(ConfigError, match=r"spec\.workspace\.git\.branch"):
        _render(_spec(workspace={"git": {"url": "https://h/r.git", "branch": "bad..name"}}))
    with pytest.raises(ConfigError, match="no credentials in the URL"):
        _render(_spec(workspace={"git": {"url": "https://u:ghp_x@git.example.com/r.git"}}))
    with pytest.raises(ValueError, match="reserved"):
        _spec(environment={"set": {"KAPSIS_AGENT_ID": "x"}})


def test_step_config_carries_no_secret() -> None:
    finisher = _containers(_render(_spec()))[FINISHER_CONTAINER]
    value = next(e["value"] for e in finisher["env"] if e["name"] == "KAPSIS_STEP_CONFIG")
    config = StepConfig.from_env_value(value)
    assert config.branch == "kapsis/fix-readme"
    assert config.credentials == "token"
    assert config.url == "https://git.example.com/team/repo.git"


def test_task_from_a_config_map_is_substituted_in_the_pod(tmp_path: Path) -> None:
    spec = _spec(
        agent={"profile": "shell", "command": ["printf", "[%s]", "do: {task}!"]},
        task={"configMapRef": {"name": "specs", "key": "fix.md"}},
    )
    rendered = _render(spec)
    task = _volume_kinds(rendered)["task"]["configMap"]
    assert task == {
        "name": "specs",
        "items": [{"key": "fix.md", "path": "task-spec.md"}],
        "defaultMode": 0o444,
    }
    argv = command_argv(spec, find_profile("shell"))
    spec_file = tmp_path / "task.md"
    spec_file.write_text('say "$HOME" `x` \\ done')
    script = argv[2].replace("/task-spec.md", str(spec_file))
    out = subprocess.run([argv[0], argv[1], script], capture_output=True, text=True, check=True)
    assert out.stdout == '[do: say "$HOME" `x` \\ done!]'


def test_the_finisher_leaves_out_the_agent_clis_own_state_files() -> None:
    rendered = _render(_spec(agent={"profile": "aider"}))
    finisher = _containers(rendered)[FINISHER_CONTAINER]
    value = next(e["value"] for e in finisher["env"] if e["name"] == "KAPSIS_STEP_CONFIG")
    assert ".aider*" in StepConfig.from_env_value(value).exclude
