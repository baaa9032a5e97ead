"""The workspace and git part of the plan: decided from the config and the repository, pure data."""

from __future__ import annotations

import getpass
import os
import subprocess
from pathlib import Path

import pytest

from kapsis.agents import find_profile
from kapsis.backends.podman import agent_run_args, workspace_volume_args
from kapsis.config.loader import load_config
from kapsis.errors import ConfigError
from kapsis.sandbox.plan import RunRequest, SandboxPlan, build_plan
from kapsis.sandbox.save_work import commit_message

from .conftest import ROOTFUL_V1

DNS = ("192.0.2.53",)  # a resolver the sandbox's gateway could use


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture(autouse=True)
def no_global_git_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "git-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", "-b", "main", str(root)], check=True)
    git(root, "config", "user.name", "Ada Tester")
    git(root, "config", "user.email", "ada@example.test")
    (root / "README.md").write_text("# r\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "initial")
    return root


def plan_for(
    project: Path, tmp_path: Path, config: str | None = None, **request: object
) -> SandboxPlan:
    config_file = None
    if config is not None:
        config_file = tmp_path / "run.yaml"
        config_file.write_text(config)
    fields: dict[str, object] = {"task": "Fix the login bug!", "agent_id": "ab12", **request}
    run_request = RunRequest(project=project, config_file=config_file, **fields)  # type: ignore[arg-type]
    loaded = load_config(project, config_file, run_request.flag_values())
    return build_plan(run_request, loaded, find_profile("shell"), ROOTFUL_V1, environ={})


def test_a_repository_gets_an_automatic_branch_from_the_checked_out_commit(
    repo: Path, tmp_path: Path, kapsis_home: Path
) -> None:
    plan = plan_for(repo, tmp_path)
    assert plan.git.branch == "kapsis/fix-the-login-bug-ab12"
    assert plan.git.start_commit == git(repo, "rev-parse", "HEAD")
    assert plan.git.base == "main"
    assert plan.git.resume is False
    assert plan.git.committer == "Ada Tester <ada@example.test>"
    assert plan.workspace.agent_git == str(kapsis_home / "sandboxes" / "ab12" / "agent-git")
    assert plan.workspace.needs_delta is False
    # Planning creates nothing: no branch yet, no files.
    assert git(repo, "branch", "--list", "kapsis/*") == ""
    assert not (kapsis_home / "sandboxes").exists()


def test_an_existing_branch_is_continued_and_needs_a_delta_layer(
    repo: Path, tmp_path: Path
) -> None:
    git(repo, "branch", "feature/x")
    git(repo, "commit", "-q", "--allow-empty", "-m", "main moves on")
    plan = plan_for(repo, tmp_path, branch="feature/x")
    assert plan.git.resume is True
    assert plan.git.start_commit == git(repo, "rev-parse", "feature/x")
    assert plan.workspace.needs_delta is True  # the checkout (main) is not the branch's tip


def test_worktree_mode_plans_a_worktree_and_a_gitlink(
    repo: Path, tmp_path: Path, kapsis_home: Path
) -> None:
    plan = plan_for(repo, tmp_path, mode="worktree")
    assert plan.workspace.mode == "worktree"
    assert plan.workspace.worktree == str(kapsis_home / "worktrees" / "repo-ab12")
    volumes = workspace_volume_args(plan)
    assert f"{plan.workspace.merged}:/workspace:nosuid,nodev" in volumes
    assert f"{plan.workspace.gitlink}:/workspace/.git:ro" in volumes
    assert f"{plan.workspace.agent_git}:/kapsis/git" in volumes
    assert f"{plan.workspace.objects}:/kapsis/objects:ro" in volumes
    assert set(volumes) <= set(agent_run_args(plan, detach=False, uid_base=0))


def test_the_users_objects_are_read_only_and_their_git_dir_is_never_mounted(
    repo: Path, tmp_path: Path
) -> None:
    volumes = workspace_volume_args(plan_for(repo, tmp_path))
    mounts = [volumes[i + 1] for i in range(0, len(volumes), 2)]
    assert all(not m.startswith(f"{repo}/.git:") for m in mounts)
    assert [m for m in mounts if m.endswith("/kapsis/objects:ro")]


@pytest.mark.parametrize(
    ("config", "flags", "expected"),
    [
        ("filesystem:\n  mode: worktree\n", {}, "filesystem.mode: 'worktree' needs a git"),
        (None, {"branch": "feature/x"}, "git.branch: "),
    ],
)
def test_git_features_on_a_plain_folder_are_usage_errors(
    project: Path, tmp_path: Path, config: str | None, flags: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        plan_for(project, tmp_path, config, **flags)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_plain_folder_runs_without_git(project: Path, tmp_path: Path) -> None:
    plan = plan_for(project, tmp_path)
    assert plan.git.repository is False
    assert plan.git.branch is None
    assert plan.workspace.agent_git is None
    assert not [v for v in workspace_volume_args(plan) if "/kapsis/" in v]


def test_a_subdirectory_of_a_repository_is_refused(repo: Path, tmp_path: Path) -> None:
    (repo / "sub").mkdir()
    with pytest.raises(ConfigError, match="inside the git repository"):
        plan_for(repo / "sub", tmp_path)


def test_no_git_identity_is_a_usage_error_naming_both_fixes(repo: Path, tmp_path: Path) -> None:
    git(repo, "config", "--unset", "user.name")
    with pytest.raises(ConfigError) as caught:
        plan_for(repo, tmp_path)
    assert "git.committer" in str(caught.value)
    assert "git config --global user.name" in str(caught.value)
    # Either fix works: the config's identity, or none needed when nothing is committed.
    plan = plan_for(repo, tmp_path, "git:\n  committer: 'Bot <bot@example.test>'\n")
    assert plan.git.committer == "Bot <bot@example.test>"
    assert plan_for(repo, tmp_path, "git:\n  auto_commit: false\n").git.committer is None


def test_an_invalid_branch_name_names_the_flag(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        plan_for(repo, tmp_path, branch="bad..name")
    assert str(caught.value).startswith("flag --branch: 'bad..name' is not a valid branch name")


def test_the_users_checked_out_branch_is_refused(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="checked out in"):
        plan_for(repo, tmp_path, branch="main")


def test_a_task_with_shell_metacharacters_becomes_a_plain_branch_name(
    repo: Path, tmp_path: Path
) -> None:
    plan = plan_for(repo, tmp_path, task="$(rm -rf /); `id` && echo ~ ^ : ? * [ \\ ..")
    assert plan.git.branch == "kapsis/rm-rf-id-echo-ab12"


def test_commit_message_template_and_co_authors(repo: Path, tmp_path: Path) -> None:
    plan = plan_for(
        repo,
        tmp_path,
        "git:\n"
        "  commit_message: '[{agent}] {task} ({agent_id} on {branch} from {base})'\n"
        "  co_authors: ['Bob Reviewer <bob@example.test>']\n",
    )
    assert commit_message(plan) == (
        "[shell] Fix the login bug! (ab12 on kapsis/fix-the-login-bug-ab12 from main)\n\n"
        "Co-authored-by: Bob Reviewer <bob@example.test>\n"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("git:\n  commit_message: '{who}'\n", "unknown field {who}"),
        ("git:\n  co_authors: ['no email here']\n", "write 'Name <email>'"),
        ("git:\n  committer: 'x@y'\n", "write 'Name <email>'"),
        ("filesystem:\n  mode: copy\n", "filesystem.mode"),
    ],
)
def test_bad_git_settings_are_one_line_errors_with_file_and_line(
    repo: Path, tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        plan_for(repo, tmp_path, text)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'run.yaml'}:2: ")
    assert expected in message


def test_rootless_overlay_shows_any_start_through_the_same_frozen_layers(
    repo: Path, tmp_path: Path
) -> None:
    from kapsis.host.facts import HostFacts

    git(repo, "branch", "feature/x")
    git(repo, "commit", "-q", "--allow-empty", "-m", "main moves on")
    rootless = HostFacts(rootless=True, cgroup_version=2, apparmor=False, dns_servers=DNS)
    request = RunRequest(project=repo, task="t", agent_id="ab12", branch="feature/x")
    loaded = load_config(repo, None, request.flag_values())
    plan = build_plan(request, loaded, find_profile("shell"), rootless, environ={})
    assert plan.git.resume and plan.workspace.base is not None
    assert plan.workspace.base_commit == git(repo, "rev-parse", "HEAD")  # the checkout's commit
    assert plan.workspace.needs_delta and plan.workspace.delta_paths == 0  # an empty commit


# --- filesystem.uncommitted: the user's state at launch -------------------------------------


def dirty(repo: Path) -> None:
    """A user at work: a tracked file changed (one staged, one not), an untracked file, and an
    ignored one."""
    (repo / ".gitignore").write_text("build/\n")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-q", "-m", "ignore build")
    (repo / "README.md").write_text("# r\nthe user's unfinished line\n")
    (repo / "staged.txt").write_text("staged by the user\n")
    git(repo, "add", "staged.txt")
    (repo / "notes.txt").write_text("untracked notes\n")
    (repo / "build").mkdir()
    (repo / "build" / "out.bin").write_text("ignored output\n")


def test_include_carries_the_users_uncommitted_state_as_a_commit_of_its_own(
    repo: Path, tmp_path: Path
) -> None:
    dirty(repo)
    head = git(repo, "rev-parse", "HEAD")
    index_before = (repo / ".git" / "index").read_bytes()

    plan = plan_for(repo, tmp_path)

    carried = plan.git.carried_commit
    assert carried is not None and plan.git.start_commit == carried
    assert git(repo, "rev-parse", f"{carried}^") == head  # on top of the checkout's commit
    changed = git(repo, "diff-tree", "-r", "--name-only", "--no-commit-id", head, carried)
    assert changed.split() == ["README.md", "notes.txt", "staged.txt"]  # not the ignored file
    assert git(repo, "show", f"{carried}:README.md").endswith("the user's unfinished line")
    assert git(repo, "log", "-1", "--format=%an <%ae>|%s", carried) == (
        "Ada Tester <ada@example.test>|Uncommitted work of root at launch"
        if os.geteuid() == 0
        else f"Ada Tester <ada@example.test>|Uncommitted work of {getpass.getuser()} at launch"
    )
    assert plan.git.carried_paths == 3
    # The base is the checkout's commit (it serves the next launches too); the user's state is
    # the delta above it. Nothing of the user's changed.
    assert plan.workspace.base_commit == head and plan.workspace.base_exists is False
    assert plan.workspace.needs_delta is True and plan.workspace.delta_paths == 3
    assert (repo / ".git" / "index").read_bytes() == index_before
    assert git(repo, "status", "--porcelain").splitlines() == [
        "M README.md",  # (the helper strips the leading blank: not staged)
        "A  staged.txt",
        "?? notes.txt",
    ]
    assert git(repo, "branch", "--list", "kapsis/*") == ""  # the branch comes at launch


def test_exclude_starts_from_the_checked_out_commit_and_hides_the_users_state(
    repo: Path, tmp_path: Path
) -> None:
    dirty(repo)
    plan = plan_for(repo, tmp_path, config="filesystem: {uncommitted: exclude}\n")
    assert plan.git.carried_commit is None
    assert plan.git.start_commit == git(repo, "rev-parse", "HEAD")
    assert plan.git.left_out_paths == 3
    # The view is the commit's tree, from the object store: nothing of the checkout's state.
    assert plan.workspace.base_commit == plan.git.start_commit
    assert plan.workspace.needs_delta is False


def test_a_clean_checkout_carries_nothing_either_way(repo: Path, tmp_path: Path) -> None:
    for setting in ("include", "exclude"):
        plan = plan_for(repo, tmp_path, config=f"filesystem: {{uncommitted: {setting}}}\n")
        assert plan.git.carried_commit is None
        assert plan.git.start_commit == git(repo, "rev-parse", "HEAD")
        assert plan.workspace.needs_delta is False


def test_a_continued_branch_or_another_base_never_carries_the_checkout(
    repo: Path, tmp_path: Path
) -> None:
    git(repo, "branch", "feature/x")
    dirty(repo)
    continued = plan_for(repo, tmp_path, branch="feature/x")
    assert continued.git.carried_commit is None and continued.git.resume
    other = plan_for(repo, tmp_path, base_branch="feature/x")
    assert other.git.carried_commit is None


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another uid needs root")
def test_share_ignored_takes_only_the_project_owners_directories(
    repo: Path, tmp_path: Path
) -> None:
    (repo / ".gitignore").write_text("node_modules/\ncache/\n")
    (repo / "node_modules").mkdir()
    (repo / "cache").mkdir()
    config = "filesystem: {share_ignored: [node_modules, cache, not_made_yet]}\n"
    plan = plan_for(repo, tmp_path, config=config)  # the control: both are the owner's
    assert [shared.path for shared in plan.workspace.shared] == ["node_modules", "cache"]
    os.chown(repo / "cache", 65534, 65534)  # say, left by another account
    with pytest.raises(ConfigError, match="not the project owner's"):
        plan_for(repo, tmp_path, config=config)
