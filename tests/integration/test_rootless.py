"""Kapsis as a normal user runs it: rootless podman, the user's own repository and storage.

Every test runs ``kapsis`` as a throwaway user that this session makes (rootless_user.py) and
removes. The sandbox must give the same guarantees as rootful where the kernel allows, and every
file the run leaves in the project and in ``~/.kapsis`` must belong to the user.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from kapsis.errors import ExitCode

from .frozen import EDIT, FROZEN_TASK, edit_once_started
from .internet import REMOTE_V4, Internet, probe_script
from .rootless_user import RootlessUser, host_settings_for_rootless, rootless_user

pytestmark = pytest.mark.integration

NO_SERVER = {"KAPSIS_NO_SERVER": "1"}  # no start-up server left running as the user
ISOLATION = (
    "id -u; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status;"
    ' awk \'$2 == "/" { split($4, o, ","); print "root " o[1] }\' /proc/self/mounts'
)


@pytest.fixture
def project(user: RootlessUser, request: pytest.FixtureRequest) -> Path:
    return user.make_repository(
        user.home / "projects" / f"{request.node.name[:30]}-{secrets.token_hex(3)}"
    )


def kapsis(user: RootlessUser, *args: str, timeout: float = 180) -> Any:
    return user.kapsis(*args, env=NO_SERVER, timeout=timeout)


def run(user: RootlessUser, project: Path, task: str, *flags: str) -> Any:
    return kapsis(user, "run", str(project), "--task", task, *flags)


def branch_files(user: RootlessUser, project: Path, branch: str) -> set[str]:
    listing = user.run(["git", "-C", str(project), "ls-tree", "-r", "--name-only", branch])
    assert listing.returncode == 0, listing.stderr
    return set(listing.stdout.split())


def agent_branch(stderr: str) -> str:
    line = next(line for line in stderr.splitlines() if "new branch " in line)
    return line.split("new branch ", 1)[1].split()[0]


def test_rootless_overlay_run_commits_as_the_user_with_the_sandbox_locked_down(
    user: RootlessUser, project: Path
) -> None:
    result = run(
        user, project, f"echo made > made.txt; {ISOLATION}",
        "--network-mode", "none", "--security-profile", "strict",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.splitlines()[0] == "1000"
    assert "CapEff:\t0000000000000000" in out
    assert "NoNewPrivs:\t1" in out
    assert "Seccomp:\t2" in out
    assert "root ro" in out.splitlines()  # the image's root file system is read-only
    branch = agent_branch(result.stderr)
    assert "made.txt" in branch_files(user, project, branch)
    # Every file the run made, in the project and in Kapsis's state, is the user's.
    assert user.not_owned(project, user.home / ".kapsis") == []
    # The user's own git works on the repository afterwards.
    for command in (["gc", "--quiet"], ["branch", "-D", branch], ["worktree", "prune"]):
        done = user.run(["git", "-C", str(project), *command])
        assert done.returncode == 0, (command, done.stderr)


def test_rootless_worktree_detached_run_can_be_followed_stopped_and_cleaned_up(
    user: RootlessUser, project: Path
) -> None:
    started = run(
        user, project, "echo wt > wt.txt; echo started; sleep 300",
        "--network-mode", "none", "--mode", "worktree", "--detach", "--agent-id", "rlwt",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    agent_id = "rlwt"
    deadline = time.monotonic() + 60
    logs = ""
    while "started" not in logs and time.monotonic() < deadline:
        logs = kapsis(user, "logs", agent_id).stdout
        time.sleep(0.5)
    assert "started" in logs
    status = json.loads(kapsis(user, "status", agent_id, "--json").stdout)
    assert status["phase"] == "running"
    assert status["work_location"].startswith(str(user.home / ".kapsis" / "worktrees"))

    stopped = kapsis(user, "stop", agent_id)
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 60
    while status["phase"] not in ("complete", "failed") and time.monotonic() < deadline:
        time.sleep(0.5)
        status = json.loads(kapsis(user, "status", agent_id, "--json").stdout)
    assert status["phase"] in ("complete", "failed")
    assert "wt.txt" in branch_files(user, project, status["branch"])
    assert user.not_owned(project, user.home / ".kapsis") == []

    cleaned = kapsis(user, "cleanup", "--agent", agent_id, "--force")
    assert cleaned.returncode == 0, cleaned.stderr
    assert not Path(status["work_location"]).exists()
    assert not (user.home / ".kapsis" / "sandboxes" / agent_id).exists()


def test_rootless_run_pushes_to_the_users_remote(user: RootlessUser, project: Path) -> None:
    remote = user.home / "remotes" / f"{project.name}.git"
    made = user.run(
        ["sh", "-c", f"git init -q --bare {remote} && git -C {project} remote add origin {remote}"]
    )
    assert made.returncode == 0, made.stderr

    result = run(user, project, "echo pushed > pushed.txt", "--network-mode", "none", "--push")

    assert result.returncode == 0, result.stderr
    branch = agent_branch(result.stderr)
    assert "pushed.txt" in branch_files(user, remote, branch)
    assert user.not_owned(project, remote) == []


@pytest.fixture
def probe_project(project: Path, user: RootlessUser) -> Path:
    written = user.run(["sh", "-c", f"cat > {project}/probe.py"], input=probe_script())
    assert written.returncode == 0, written.stderr
    return project


def probe(
    user: RootlessUser, project: Path, internet: Internet, checks: list[list[Any]], *flags: str
) -> list[dict[str, Any]]:
    config = user.home / "network.yaml"
    settings = f"network:\n  dns_servers: [{internet.dns_server}]\n"
    user.run(["sh", "-c", f"cat > {config}"], input=settings)
    task = f"python3 /workspace/probe.py '{json.dumps(checks)}'"
    result = run(user, project, task, "--config", str(config), *flags)
    assert result.returncode == 0, result.stderr
    outcome: list[dict[str, Any]] = json.loads(result.stdout.strip().splitlines()[-1])
    return outcome


def test_rootless_filtered_mode_reaches_the_allowlist_and_nothing_else(
    user: RootlessUser, probe_project: Path, internet: Internet
) -> None:
    resolver = "127.0.0.1"  # the gateway's, as the agent sees it
    internet.reset_logs()
    allowed, other, direct = probe(
        user, probe_project, internet,
        [["resolve", "allowed.test", resolver, "A"], ["resolve", "other.test", resolver, "A"],
         ["http", REMOTE_V4, "/", 80, "allowed.test"]],
        "--allow", "allowed.test",
    )  # fmt: skip
    assert allowed == {"rcode": 0, "addresses": [REMOTE_V4]}
    assert "error" in other or other.get("addresses", []) == []
    # allowed.test's address is now reachable by name (through the gateway's proxy); it was
    # resolved above in the same run.
    assert direct.get("status") == 200

    refused = probe(user, probe_project, internet, [["http", REMOTE_V4]], "--allow", "other.test")
    assert "error" in refused[0]  # an address no allowed name resolved to stays closed
    # Control: the same request leaves an open sandbox, so the refusal above is the filter's.
    opened = probe(user, probe_project, internet, [["http", REMOTE_V4]], "--network-mode", "open")
    assert opened[0].get("status") == 200
    assert user.not_owned(probe_project, user.home / ".kapsis") == []


def setup_check(user: RootlessUser, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = user.kapsis("setup", "--check", "--json", env={**NO_SERVER, **(env or {})})
    report: dict[str, Any] = json.loads(result.stdout)
    return {check["name"]: check for check in report["checks"]} | {"ok": report["ok"]}


def test_setup_check_passes_for_the_user_and_names_vfs_storage_with_its_fix(
    user: RootlessUser,
) -> None:
    checks = setup_check(user)
    assert checks["ok"], [c for c in checks.values() if isinstance(c, dict) and not c["ok"]]
    assert checks["storage driver"]["detail"] == "overlay (native)"
    # /dev/fuse is left locked (0600) on these machines: native overlay does not need it.
    assert not checks["/dev/fuse"]["required"]
    assert checks["XDG_RUNTIME_DIR"]["ok"]

    # A user whose podman came up with vfs: a home of its own (podman's database, which pins
    # the driver, lives there) whose storage.conf says vfs.
    scratch = user.home / "vfs-user"
    conf = scratch / ".config" / "containers" / "storage.conf"
    settings = f'[storage]\ndriver = "vfs"\nrunroot = "{user.runtime_dir}/vfs-run"\n'
    user.run(["sh", "-c", f"mkdir -p {conf.parent} && cat > {conf}"], input=settings)
    vfs = setup_check(user, {"HOME": str(scratch)})
    assert not vfs["ok"]
    assert not vfs["storage driver"]["ok"]
    assert "podman system reset" in vfs["storage driver"]["fix"]
    # No runtime dir: the fix makes it without systemd.
    no_runtime = setup_check(user, {"XDG_RUNTIME_DIR": ""})
    assert not no_runtime["XDG_RUNTIME_DIR"]["ok"]
    assert no_runtime["XDG_RUNTIME_DIR"]["fix"].startswith(
        f"sudo install -d -m 700 -o {user.name} /run/user/{user.uid}"
    )


def test_a_run_podman_refuses_to_start_leaves_no_branch(
    user: RootlessUser, project: Path, base_image: str
) -> None:
    # A container already holding the agent container's name: podman refuses the run (125),
    # which the foreground launch learns only when it waits for the container.
    taken = user.podman("create", "--name", "kapsis-rlrefused-agent", base_image, "true")
    assert taken.returncode == 0, taken.stderr
    try:
        result = run(
            user, project, "echo never > never.txt", "--network-mode", "none",
            "--agent-id", "rlrefused",
        )  # fmt: skip
    finally:
        user.podman("rm", "--force", "kapsis-rlrefused-agent")
    assert result.returncode == ExitCode.SANDBOX_FAILED, result.stderr
    assert "podman could not start the agent container" in result.stderr
    branches = user.run(["git", "-C", str(project), "branch", "--list", "kapsis/*"])
    assert branches.returncode == 0 and branches.stdout.strip() == ""


def test_a_fresh_user_builds_the_images_with_kapsis_setup_and_runs(base_image: str) -> None:
    """The README's rootless steps from nothing: no images, no cache; `kapsis setup` as the
    user builds both images in the user's own storage (debootstrap under podman unshare)."""
    with host_settings_for_rootless(), rootless_user([]) as fresh:
        before = fresh.kapsis("setup", "--check", "--json", env=NO_SERVER)
        report = json.loads(before.stdout)
        missing = {c["name"] for c in report["checks"] if not c["ok"] and c["required"]}
        assert before.returncode == ExitCode.HOST_UNSUPPORTED and "base image" in missing, missing

        built = fresh.kapsis("setup", env=NO_SERVER, timeout=900)
        assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
        project = fresh.make_repository(fresh.home / "project")
        result = run(fresh, project, "echo first > first.txt", "--network-mode", "none")
        assert result.returncode == 0, result.stderr
        assert "first.txt" in branch_files(fresh, project, agent_branch(result.stderr))
        assert fresh.not_owned(project, fresh.home / ".kapsis") == []


def test_rootless_include_carries_the_users_changes_and_exclude_leaves_them_out(
    user: RootlessUser, project: Path
) -> None:
    changed = user.run(["sh", "-c", f"echo 'unfinished' >> {project}/base.txt"])
    assert changed.returncode == 0, changed.stderr
    task = "cat base.txt; echo agent > agent.txt"

    result = run(user, project, task, "--network-mode", "none")

    assert result.returncode == 0, result.stderr
    assert "unfinished" in result.stdout  # the agent sees the user's files, as at launch
    branch = agent_branch(result.stderr)
    subjects = user.run(["git", "-C", str(project), "log", "--format=%s", f"main..{branch}"])
    assert subjects.stdout.splitlines()[1] == f"Uncommitted work of {user.name} at launch"
    assert user.not_owned(project, user.home / ".kapsis") == []

    config = user.home / "exclude.yaml"
    user.run(["sh", "-c", f"cat > {config}"], input="filesystem:\n  uncommitted: exclude\n")
    for mode in ("overlay", "worktree"):
        excluded = run(
            user, project, task, "--network-mode", "none", "--config", str(config),
            "--mode", mode,
        )  # fmt: skip
        assert excluded.returncode == 0, excluded.stderr
        assert "unfinished" not in excluded.stdout, mode
        files = branch_files(user, project, agent_branch(excluded.stderr))
        assert "agent.txt" in files


def test_rootless_overlay_is_frozen_at_launch(user: RootlessUser, project: Path) -> None:
    """The user's edit made while the agent runs never reaches the agent or its branch."""

    def edit() -> None:
        user.run(["sh", "-c", f"printf '{EDIT}' >> {project}/base.txt"])

    with edit_once_started(user.home / ".kapsis", edit) as edited:
        result = run(user, project, FROZEN_TASK, "--network-mode", "none")
    assert edited.is_set(), "the agent never said it started"
    assert result.returncode == 0, result.stderr
    branch = agent_branch(result.stderr)
    show = "git", "-C", str(project), "show"
    assert user.run([*show, f"{branch}:after.txt"]).stdout == "base\n"
    assert user.run([*show, f"{branch}:base.txt"]).stdout == "base\nagent\n"
    # The control: the edit is in the checkout, untouched by the run.
    assert (project / "base.txt").read_text() == "base\n" + EDIT
