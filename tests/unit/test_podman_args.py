"""The podman command lines a plan translates to (pure functions; nothing is run)."""

from __future__ import annotations

import pytest

from kapsis.backends.podman import PodmanBackend, agent_run_args, keep_id_args, pod_create_args
from kapsis.host.facts import HostFacts

DNS = ("192.0.2.53",)  # a resolver the sandbox's gateway could use

ROOTFUL = HostFacts(rootless=False, cgroup_version=2, apparmor=False, dns_servers=DNS)
ROOTLESS = HostFacts(rootless=True, cgroup_version=2, apparmor=False, dns_servers=DNS)
UID_BASE = 1_500_065_536


def _values(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag`` (as ``--flag VALUE``)."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


@pytest.fixture
def run_args(make_plan):
    def build(**kwargs):
        plan = make_plan(**kwargs)
        return plan, agent_run_args(plan, detach=False, uid_base=UID_BASE)

    return build


def _before_image(plan, argv: list[str]) -> list[str]:
    return argv[: len(argv) - len(plan.command) - 1]


def test_standard_drops_all_capabilities(run_args):
    _plan, argv = run_args()

    assert _values(argv, "--cap-drop") == ["ALL"]


def test_standard_sets_no_new_privileges_and_seccomp_file(run_args, kapsis_home):
    plan, argv = run_args()

    security_opts = _values(argv, "--security-opt")
    assert "no-new-privileges" in security_opts
    seccomp_file = kapsis_home / "sandboxes" / plan.agent_id / "seccomp.json"
    assert f"seccomp={seccomp_file}" in security_opts


def test_minimal_has_no_hardening_flags(run_args):
    _plan, argv = run_args(security_profile="minimal")

    assert "--cap-drop" not in argv
    assert "--read-only" not in argv
    assert "--pids-limit" not in argv
    assert not [o for o in _values(argv, "--security-opt") if o.startswith("seccomp=")]
    assert "no-new-privileges" not in _values(argv, "--security-opt")


def test_cap_add_follows_cap_drop(run_args):
    _plan, argv = run_args(config="security:\n  overrides:\n    cap_add: [net_bind_service]\n")

    assert _values(argv, "--cap-add") == ["CAP_NET_BIND_SERVICE"]
    assert argv.index("--cap-drop") < argv.index("--cap-add")


def test_standard_root_is_writable(run_args):
    _plan, argv = run_args()

    assert "--read-only" not in argv


def test_strict_root_is_read_only(run_args):
    plan, argv = run_args(security_profile="strict")

    assert "--read-only" in _before_image(plan, argv)


def test_strict_tmp_is_noexec_tmpfs(run_args):
    _plan, argv = run_args(security_profile="strict")

    (tmp,) = [t for t in _values(argv, "--tmpfs") if t.startswith("/tmp:")]
    assert "noexec" in tmp.split(":", 1)[1].split(",")
    assert "nosuid" in tmp.split(":", 1)[1].split(",")


def test_standard_tmp_is_a_tmpfs_without_noexec(run_args):
    _plan, argv = run_args()

    (tmp,) = [t for t in _values(argv, "--tmpfs") if t.startswith("/tmp:")]
    assert "noexec" not in tmp


def test_paranoid_passes_the_apparmor_profile(run_args):
    _plan, argv = run_args(
        security_profile="paranoid",
        host=HostFacts(rootless=False, cgroup_version=2, apparmor=True, dns_servers=DNS),
    )

    assert "apparmor=kapsis-paranoid" in _values(argv, "--security-opt")


@pytest.mark.parametrize(("profile", "pids"), [("standard", "1024"), ("strict", "256")])
def test_pids_limit_comes_from_the_profile(run_args, profile, pids):
    _plan, argv = run_args(security_profile=profile)

    assert _values(argv, "--pids-limit") == [pids]


def test_memory_and_swap_are_the_same_number_of_bytes(run_args):
    # The limit may sit on the pod or on the agent container; it must be set, with no swap.
    plan, argv = run_args(memory="512m")
    both = pod_create_args(plan) + argv

    assert _values(both, "--memory") == [str(512 * 1024**2)]
    assert _values(both, "--memory-swap") == [str(512 * 1024**2)]


def test_cpus_and_timeout(run_args):
    _plan, argv = run_args(cpus=1.5, timeout="1h")

    assert _values(argv, "--cpus") == ["1.5"]
    assert _values(argv, "--timeout") == ["3600"]


def test_the_default_limit_is_two_hours_and_null_is_none(run_args):
    _plan, argv = run_args()
    assert _values(argv, "--timeout") == ["7200"]

    _plan, argv = run_args(config="resources:\n  timeout: null\n")
    assert "--timeout" not in argv


def test_network_none_for_mode_none(run_args):
    _plan, argv = run_args(network_mode="none")

    assert _values(argv, "--network") == ["none"]


def test_network_bridge_for_mode_open(run_args):
    _plan, argv = run_args(network_mode="open")

    assert _values(argv, "--network") == ["podman"]  # podman's default bridge network


def test_filtered_agent_joins_the_gateways_namespace(run_args):
    plan, argv = run_args()

    assert plan.network.gateway is not None
    assert _values(argv, "--network") == [f"container:{plan.network.gateway.container_name}"]


def test_agent_container_joins_a_pod_without_infra(run_args):
    plan, argv = run_args()
    pod = pod_create_args(plan)

    assert _values(argv, "--pod") == [plan.pod_name]
    assert _values(argv, "--name") == [plan.container_name]
    assert "--infra=false" in pod
    assert "--network" not in pod


def test_rootful_agent_maps_a_private_uid_range(run_args):
    _plan, argv = run_args(host=ROOTFUL)

    assert _values(argv, "--uidmap") == [f"0:{UID_BASE}:65536"]
    assert _values(argv, "--gidmap") == [f"0:{UID_BASE}:65536"]
    assert "--userns" not in argv


def test_rootless_agent_keeps_the_user_id(run_args):
    """Container uid 1000 is the invoking user (podman's namespace id 0), so the agent's files
    land owned by the user; every other container id is one of the user's subordinate ids, but
    for the three whose images would be the gateway's uids (990-992), which stay unmapped."""
    _plan, argv = run_args(host=ROOTLESS)

    # podman 4.3 refuses --userns on a container that joins a pod: the maps spell keep-id.
    assert "--userns" not in argv
    maps = ["0:1:989", "992:993:8", "1000:0:1", "1001:1001:64535"]
    assert _values(argv, "--uidmap") == maps
    assert _values(argv, "--gidmap") == maps
    assert _values(argv, "--user") == ["1000:1000"]


def _spans(args: list[str]) -> list[tuple[int, ...]]:
    uid = [tuple(map(int, m.split(":"))) for m in args[1::4]]
    gid = [tuple(map(int, m.split(":"))) for m in args[3::4]]
    assert uid == gid
    return uid


def test_keep_id_maps_cover_the_namespace_once_but_for_reserved_ids():
    """Every container id maps to at most one namespace id and none twice; every namespace id is
    the image of one container id, but the reserved ones (the gateway's uids): with no container
    id mapped onto them, no process of the agent is ever taken for the gateway's resolver or
    proxy by the firewall, whatever uid it takes."""
    for agent, size, reserved in [
        (1000, 65536, (990, 991, 992)),
        (1000, 65536, ()),
        (1, 4096, (990, 991, 992)),
        (500, 1001, (990, 991, 992)),
        (1000, 65536, (1000, 1)),
    ]:
        spans = _spans(keep_id_args(agent, size, reserved))
        inside = sorted(i for start, _, n in spans for i in range(start, start + n))
        outside = sorted(o for _, start, n in spans for o in range(start, start + n))
        assert outside == [o for o in range(size) if o not in reserved]
        assert len(inside) == len(set(inside)) and set(inside) <= set(range(size))
        image = {
            i: o
            for start, ostart, n in spans
            for i, o in zip(range(start, start + n), range(ostart, ostart + n), strict=True)
        }
        assert image.get(agent) == (None if 0 in reserved else 0)
        assert not set(image.values()) & set(reserved)


def test_keep_id_leaves_the_gateways_uids_out_by_default():
    from kapsis.network.gateway_layout import GATEWAY_UIDS

    spans = _spans(keep_id_args(1000, 65536))
    images = {o for _, start, n in spans for o in range(start, start + n)}
    assert not images & set(GATEWAY_UIDS)
    # The agent is still the user, and container root a subordinate id.
    assert (1000, 0, 1) in spans and spans[0][:2] == (0, 1)


def test_rootful_agent_runs_as_uid_1000(run_args):
    _plan, argv = run_args(host=ROOTFUL)

    assert _values(argv, "--user") == ["1000:1000"]


def test_rootful_workspace_is_the_merged_overlay(run_args, kapsis_home):
    plan, argv = run_args(host=ROOTFUL)

    merged = kapsis_home / "sandboxes" / plan.agent_id / "merged"
    assert f"{merged}:/workspace:nosuid,nodev" in _values(argv, "--volume")
    assert not [v for v in _values(argv, "--volume") if v.startswith(f"{plan.project}:")]


def test_rootless_workspace_is_a_podman_overlay_of_the_project(run_args, kapsis_home, project):
    plan, argv = run_args(host=ROOTLESS)

    sandbox = kapsis_home / "sandboxes" / plan.agent_id
    expected = (
        f"{project.resolve()}:/workspace:O,upperdir={sandbox / 'upper'},workdir={sandbox / 'work'}"
    )
    assert expected in _values(argv, "--volume")


def test_extra_mounts_are_read_only_volumes(run_args, tmp_path):
    data = tmp_path / "data"
    data.mkdir()

    _plan, argv = run_args(
        config=f"filesystem:\n  mounts:\n    - source: {data}\n      target: /d\n"
    )

    assert f"{data.resolve()}:/d:ro" in _values(argv, "--volume")


def test_env_values_are_passed(run_args):
    plan, argv = run_args(task="make test", config="environment:\n  set:\n    LANG: C\n")

    envs = _values(argv, "--env")
    assert "LANG=C" in envs
    assert "KAPSIS_TASK=make test" in envs
    assert f"KAPSIS_AGENT_ID={plan.agent_id}" in envs


def test_the_log_goes_into_the_sandbox_dirs_pipe_for_the_host_to_redact(run_args, kapsis_home):
    plan, argv = run_args()

    assert _values(argv, "--log-driver") == ["k8s-file"]
    fifo = kapsis_home / "sandboxes" / plan.agent_id / "transcript.fifo"
    assert _values(argv, "--log-opt") == [f"path={fifo}"]
    # In the foreground the client attaches only stdin: output comes through the pipe alone.
    assert _values(argv, "--attach") == ["stdin"]


def test_image_then_command_come_last(run_args):
    plan, argv = run_args(task="echo done", image="localhost/custom:1")

    assert argv[-len(plan.command) - 1 :] == ["localhost/custom:1", *plan.command]
    assert plan.command[:2] == ("sh", "-c") and plan.command[-1] == "echo done"


def test_image_is_never_pulled(run_args):
    _plan, argv = run_args()

    assert _values(argv, "--pull") == ["never"]


def test_detach_and_attach_modes(make_plan):
    plan = make_plan()

    assert "--detach" in agent_run_args(plan, detach=True, uid_base=UID_BASE)
    assert "--detach" not in agent_run_args(plan, detach=False, uid_base=UID_BASE)


def test_foreground_container_is_removed_by_podman_detached_one_is_kept(make_plan):
    plan = make_plan()

    assert "--rm" in agent_run_args(plan, detach=False, uid_base=UID_BASE)
    assert "--rm" not in agent_run_args(plan, detach=True, uid_base=UID_BASE)


def test_labels_identify_the_agent(make_plan):
    plan = make_plan(agent_id="lbl1")

    for argv in (pod_create_args(plan), agent_run_args(plan, detach=True, uid_base=UID_BASE)):
        assert "io.kapsis.agent-id=lbl1" in _values(argv, "--label")


def test_describe_uses_a_placeholder_for_the_uid_range(make_plan):
    plan = make_plan(host=ROOTFUL, network_mode="none")

    pod, run = PodmanBackend().describe(plan)

    assert pod[:3] == ["podman", "pod", "create"]
    assert run[:2] == ["podman", "run"]
    assert _values(run, "--uidmap")[0].startswith("0:<")
