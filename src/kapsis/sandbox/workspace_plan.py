"""The workspace and git part of a plan: where the agent's files live and which branch they go to.

Decided before anything runs, from the config and the repository as it is at planning time: the
workspace mode and its host paths, the agent's branch (given, or derived from the task), the
commit it starts from, whether it continues an existing branch, and what the host does with the
work afterwards (commit identity, message, exclusions, push, post-push hook).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from kapsis import paths
from kapsis.config.loader import LoadedConfig
from kapsis.config.models import WorkspaceMode, duration_to_seconds, memory_to_bytes
from kapsis.errors import ConfigError, SandboxError
from kapsis.git.branches import auto_branch_name, check_branch_name, resolve_target
from kapsis.git.hidden import HideRules, hide_rules
from kapsis.git.owner import RepoOwner, foreign_entries
from kapsis.git.runner import Repo
from kapsis.sandbox.plan_model import PlanModel

WORKSPACE_TARGET = "/workspace"
# Runs whose work is only in their sandbox dir or worktree: removing that would lose it.
UNSAVED_ERROR_TYPES = frozenset({"commit_failed", "interrupted"})
AGENT_GIT_TARGET = "/kapsis/git"
OBJECTS_TARGET = "/kapsis/objects"


class WorkspacePlan(PlanModel):
    """The project as the agent sees it: a copy-on-write view or a worktree, writes on the host.

    ``root`` is the sandbox's host dir. Overlay mode uses ``upper`` (the agent's writes),
    ``work``, ``lower`` (where the base is bound, idmapped) and ``delta`` (the start commit's
    differences from the base, when they differ); ``merged`` is what the sandbox mounts at
    ``target`` in either mode. In a git project the base is a frozen checkout of
    ``base_commit`` at ``base`` (:mod:`kapsis.workspace.bases`); elsewhere it is the project
    itself, live. ``agent_git`` is the agent's own git directory, which sees the project's
    objects read-only at ``/kapsis/objects`` and has one branch.
    """

    mode: WorkspaceMode = "overlay"
    project: str
    target: str = WORKSPACE_TARGET
    root: str
    upper: str
    work: str
    lower: str
    merged: str
    delta: str
    needs_delta: bool = False
    base: str | None = None
    base_commit: str | None = None
    base_key: str | None = None
    # Who owns the base's files: the repository's owner, or the runner.
    base_uid: int | None = None
    # Whether the base existed when the run was planned (else this launch makes it).
    base_exists: bool = False
    delta_paths: int = 0
    # filesystem.share_ignored, as found at planning.
    shared: tuple[SharedDir, ...] = ()
    worktree: str | None = None
    release_worktree: str | None = None
    agent_git: str | None = None
    objects_source: str | None = None
    objects: str | None = None
    gitlink: str | None = None
    # Owners when the run was planned, of the project and of its git dir (and so of a worktree
    # and the object store); root checks them again before it mounts those for the agent.
    project_uid: int | None = None
    git_uid: int | None = None
    # resources.disk, where enforced: the workspace's writable part (the overlay's upper and
    # work dirs, or the worktree) is a filesystem of this size of its own, made in the file
    # ``disk_image`` and mounted at ``disk_mount`` (kapsis.workspace.disk).
    disk_bytes: int | None = None
    disk_image: str | None = None
    disk_mount: str | None = None
    # The disk is one of the helper's (kapsis.workspace.disk_helper), at its path, its root
    # owned by ``disk_uid``: rootless (made through sudo), or root's worktree of another
    # user's repository (made in-process, for that user).
    disk_by_helper: bool = False
    disk_uid: int | None = None
    # filesystem.hide, and how many of the start commit's files it hid at planning (a project
    # that is not a repository is looked at when the layers are made).
    hide: tuple[str, ...] = ()
    hidden_paths: int = 0


class SharedDir(PlanModel):
    """An ignored directory of the checkout (the project owner's, as every step to it) shown
    read-only, live, at the same place."""

    path: str
    # Rootful: where the host binds it (idmapped, read-only) for podman to mount.
    bound: str


class GitPlan(PlanModel):
    """The agent's branch and what the host does with the agent's work when it ends."""

    repository: bool
    branch: str | None = None
    base: str | None = None
    start_commit: str | None = None
    resume: bool = False
    git_dir: str | None = None
    common_dir: str | None = None
    auto_commit: bool = False
    auto_push: bool = False
    remote: str = "origin"
    push_timeout_seconds: int = 120
    commit_message: str = ""
    co_authors: tuple[str, ...] = ()
    committer: str | None = None
    commit_exclude: tuple[str, ...] = ()
    # The agent CLI's own files (its profile's state_files): left out like commit_exclude,
    # said apart from it.
    state_files: tuple[str, ...] = ()
    max_file_size: int = 100 * 1024**2
    post_push_hook: str | None = None
    # filesystem.uncommitted: include carried the user's uncommitted state as this commit, the
    # start commit's parent's child (the agent starts from it); these paths were in it.
    carried_commit: str | None = None
    carried_paths: int = 0
    # filesystem.uncommitted: exclude left this many uncommitted paths out of the agent's view.
    left_out_paths: int = 0

    @property
    def commits(self) -> bool:
        return self.repository and self.auto_commit


DISK_IMAGE = "disk.img"
DISK_LAYER = "layer"
# Kept free of every agent's disk on the filesystem of ~/.kapsis: the audit trails, the status
# files and the logs are written there, whatever the agents write.
HOST_RESERVE = 256 * 1024**2
# A quota smaller than this is no workspace: the run is refused instead.
MIN_DISK = 64 * 1024**2


def with_disk_quota(
    workspace: WorkspacePlan, disk_bytes: int | None, *, rootless: bool
) -> tuple[WorkspacePlan, str | None]:
    """The workspace with its writable part on a filesystem of ``disk_bytes`` of its own, where
    this host can make one; else the workspace as it was and the reason why not.

    The filesystem is a sparse file on the filesystem of ``~/.kapsis``: it takes blocks only as
    the agent writes. So that no agent alone can fill that filesystem through it, the quota is
    at most what is free there at launch, less :data:`HOST_RESERVE` (``disk_bytes`` of the
    result says what it is). Agents that run together share the free space: their disks are
    not reserved whole, or eight agents of 10g would need 80 GB free to start."""
    if disk_bytes is None:
        return workspace, "resources.disk is null"
    if rootless:
        return _with_helper_disk(workspace, disk_bytes, os.geteuid(), through_sudo=True)
    if workspace.mode == "worktree" and workspace.git_uid not in (None, os.geteuid()):
        # Root does not mount in another user's home (they could swap a step of the path for
        # a link): the worktree goes on a helper's disk for them, at a path of root's.
        return _with_helper_disk(workspace, disk_bytes, workspace.git_uid, through_sudo=False)
    root = Path(workspace.root)
    disk_bytes = min(disk_bytes, room_for_a_disk(root, disk_bytes))
    disk = {"disk_bytes": disk_bytes, "disk_image": str(root / DISK_IMAGE)}
    if workspace.mode == "worktree":
        return workspace.model_copy(update={**disk, "disk_mount": workspace.worktree}), None
    layer = root / DISK_LAYER
    update = {**disk, "disk_mount": str(layer)}
    update |= {"upper": str(layer / "upper"), "work": str(layer / "work")}
    return workspace.model_copy(update=update), None


def _with_helper_disk(
    workspace: WorkspacePlan, disk_bytes: int, uid: int, *, through_sudo: bool
) -> tuple[WorkspacePlan, str | None]:
    """A disk of the helper's for user ``uid``: rootless, made through sudo; as root (for the
    owner of the repository), made in-process."""
    from kapsis.workspace import disk, disk_helper

    if through_sudo:
        gap = disk.helper_gap()
        if gap is not None:
            return workspace, gap
    room = disk.helper_room()
    if room < min(disk_bytes, MIN_DISK):
        raise SandboxError(
            f"no room for the agent's disk on the filesystem of {disk_helper.STATE}: "
            f"{room // 1024**2} MiB left once the other agents' disks may fill up; free some "
            "space, give each agent less (--disk 2g), or set resources.disk: null to run "
            "without a disk limit"
        )
    agent_id = Path(workspace.root).name
    mount = disk_helper.mount_point(uid, agent_id)
    image = disk_helper.images_dir(disk_helper.STATE, uid) / f"{agent_id}.img"
    update: dict[str, object] = {
        "disk_bytes": min(disk_bytes, room),
        "disk_image": str(image),
        "disk_mount": str(mount),
        "disk_by_helper": True,
        "disk_uid": uid,
    }
    if workspace.mode == "worktree":
        update["worktree"] = str(mount)
    else:
        update |= {"upper": str(mount / "upper"), "work": str(mount / "work")}
    return workspace.model_copy(update=update), None


def room_for_a_disk(root: Path, wanted: int) -> int:
    """What a new agent's disk may take on the filesystem of ``root`` (its sandbox dir): what
    is free there now, less :data:`HOST_RESERVE` and less what the other agents' disks there
    may still take (they are sparse: each may grow to its full size)."""
    from kapsis.workspace.disk_helper import promised_bytes

    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    facts = os.statvfs(existing)
    free = facts.f_bavail * facts.f_frsize
    promised = promised_bytes(existing, other_disks(existing, root))
    room = free - HOST_RESERVE - promised
    if room < min(wanted, MIN_DISK):
        raise SandboxError(
            f"no room for the agent's disk on the filesystem of {existing}: "
            f"{free / 1024**2:.0f} MiB free, {HOST_RESERVE // 1024**2} MiB of it kept for the "
            f"audit trail and status and {promised / 1024**2:.0f} MiB for the other agents' "
            "disks (`kapsis cleanup` releases those of finished agents); free some space, give "
            "each agent less (--disk 2g), or set resources.disk: null to run without a disk limit"
        )
    return room


def other_disks(filesystem: Path, root: Path) -> list[Path]:
    """The disk images of the other sandboxes, and those of the disk helper (rootless users'),
    that lie on the filesystem of ``filesystem``."""
    from kapsis.workspace.disk_helper import STATE, all_images

    device = filesystem.stat().st_dev
    sandboxes = [sandbox for sandbox in paths.sandboxes_dir().glob("*") if sandbox != root]
    images = [sandbox / DISK_IMAGE for sandbox in sandboxes]
    with contextlib.suppress(OSError):  # not root: the helper's are not ours to see
        images += all_images(STATE)
    return [image for image in images if image.is_file() and image.stat().st_dev == device]


def plan_workspace_and_git(
    loaded: LoadedConfig,
    project: Path,
    agent_id: str,
    task_summary: str,
    state_files: Sequence[str] = (),
) -> tuple[WorkspacePlan, GitPlan]:
    config = loaded.config
    mode = config.filesystem.mode
    root = paths.sandbox_dir(agent_id)
    repo = Repo.discover(project)
    if repo is not None and repo.root.resolve() != project:
        raise ConfigError(
            f"PROJECT {project} is a folder inside the git repository {repo.root}; pass the "
            "repository's top level so the agent's branch holds the whole project"
        )
    if repo is not None and repo.owner is not None:
        _check_owned(repo, repo.owner, worktree=mode == "worktree")
    mode_origin = loaded.origin_of(("filesystem", "mode"))
    branch_origin = str(loaded.origin_of(("git", "branch")))
    workspace = WorkspacePlan(
        mode=mode,
        project=str(project),
        project_uid=_owner_uid(project),
        root=str(root),
        upper=str(root / "upper"),
        work=str(root / "work"),
        lower=str(root / "lower"),
        merged=str(root / "merged"),
        delta=str(root / "delta"),
        hide=tuple(dict.fromkeys(config.filesystem.hide)),
    )
    if repo is None:
        if mode == "worktree":
            raise ConfigError(
                f"{mode_origin}: filesystem.mode: 'worktree' needs a git repository, and "
                f"{project} is not one; use overlay, or `git init` the project"
            )
        if config.git.branch is not None:
            raise ConfigError(
                f"{branch_origin}: git.branch: {project} is not a git repository, so there is "
                "no branch to work on; drop it, or `git init` the project"
            )
        # The project itself is the lower layer: what it hides is whited out above it.
        return workspace.model_copy(update={"needs_delta": bool(workspace.hide)}), GitPlan(
            repository=False
        )

    git = config.git
    branch = (
        check_branch_name(git.branch, branch_origin)
        if git.branch
        else auto_branch_name(task_summary, agent_id)
    )
    target = resolve_target(
        repo,
        branch,
        git.base_branch,
        branch_origin=branch_origin,
        base_origin=str(loaded.origin_of(("git", "base_branch"))),
        releasable=_finished_worktrees(),
    )
    head = repo.rev("HEAD^{commit}")
    committer = git.committer or _user_identity(repo)
    if git.auto_commit and committer is None:
        raise ConfigError(
            f"the host commits the agent's work as you, but git has no identity for {project}; "
            "set git.committer ('Name <email>') in agent-sandbox.yaml, or run "
            "`git config --global user.name NAME` and `git config --global user.email EMAIL`"
        )
    carried: tuple[str, int] | None = None
    left_out = 0
    if head is not None and target.start_commit == head and not target.resume:
        # A new branch from the checkout: what the user has not committed is carried or left.
        from kapsis.git.snapshot import carry_commit, working_state

        state = working_state(repo, head, workspace.hide)
        if not state.clean and config.filesystem.uncommitted == "include":
            who = repo.owner.name if repo.owner is not None else _account_name()
            identity = committer or f"{who} <{who}@localhost>"
            commit = carry_commit(repo, head, state, identity, who)
            carried = (commit, len(state.changed))
            target = replace(target, start_commit=commit)
        elif not state.clean:
            left_out = len(state.changed)
    with hide_rules(workspace.hide) as rules:
        hidden = len(rules.tracked(repo, target.start_commit))
        _check_shared_not_hidden(rules, loaded)
    git_view = {
        "git_uid": _owner_uid(repo.common_dir),
        "release_worktree": str(target.release_worktree) if target.release_worktree else None,
        "agent_git": str(root / "agent-git"),
        "objects_source": str(repo.common_dir / "objects"),
        "objects": str(root / "objects"),
    }
    if mode == "worktree":
        owner_home = repo.owner.home if repo.owner is not None else None
        worktree = paths.worktrees_dir(owner_home) / f"{project.name}-{agent_id}"
        workspace = workspace.model_copy(
            update={**git_view, "worktree": str(worktree), "gitlink": str(root / "gitlink")}
        )
    else:
        from kapsis.workspace.bases import choose_base

        # Frozen layers, never the live checkout: a shared base, the start commit's
        # differences from it on top.
        base = choose_base(repo, target.start_commit, head)
        workspace = workspace.model_copy(
            update={
                **git_view,
                "base": base.tree,
                "base_commit": base.commit,
                "base_key": base.key,
                "base_uid": repo.owner.uid if repo.owner is not None else os.geteuid(),
                "base_exists": base.exists,
                "delta_paths": base.delta_paths,
                # The hidden files are whited out in the delta.
                "needs_delta": base.commit != target.start_commit or hidden > 0,
            }
        )
    workspace = workspace.model_copy(update={"hidden_paths": hidden})
    shared = _shared_dirs(repo, loaded, project, root, target.start_commit)
    if shared:
        workspace = workspace.model_copy(update={"shared": shared})
    git_plan = GitPlan(
        repository=True,
        branch=target.branch,
        base=target.base,
        start_commit=target.start_commit,
        resume=target.resume,
        git_dir=str(repo.git_dir),
        common_dir=str(repo.common_dir),
        auto_commit=git.auto_commit,
        auto_push=git.auto_push,
        remote=git.remote,
        push_timeout_seconds=duration_to_seconds(git.push_timeout),
        commit_message=git.commit_message,
        co_authors=tuple(git.co_authors),
        committer=committer,
        commit_exclude=tuple(git.commit_exclude),
        state_files=() if git.commit_agent_state else tuple(state_files),
        max_file_size=memory_to_bytes(git.max_file_size),
        post_push_hook=git.post_push_hook,
        carried_commit=carried[0] if carried else None,
        carried_paths=carried[1] if carried else 0,
        left_out_paths=left_out,
    )
    return workspace, git_plan


def _check_shared_not_hidden(rules: HideRules, loaded: LoadedConfig) -> None:
    """A shared folder is the live one, whole: one that filesystem.hide hides is refused."""
    names = loaded.config.filesystem.share_ignored
    hidden = rules.matching(f"{name}/" for name in names)
    if hidden:
        origin = loaded.origin_of(("filesystem", "share_ignored"))
        raise ConfigError(
            f"{origin}: filesystem.share_ignored: {sorted(hidden)[0].rstrip('/')} is hidden by "
            "filesystem.hide; share another folder, or stop hiding it"
        )


def _shared_dirs(
    repo: Repo, loaded: LoadedConfig, project: Path, root: Path, start: str
) -> tuple[SharedDir, ...]:
    """filesystem.share_ignored as found now: existing directories of the project's owner, none
    tracked by git, in itself, below or on the way to it."""
    names = list(dict.fromkeys(loaded.config.filesystem.share_ignored))
    if not names:
        return ()
    origin = loaded.origin_of(("filesystem", "share_ignored"))
    tracked = _first_tracked(repo, start, names)
    if tracked is not None:
        raise ConfigError(
            f"{origin}: filesystem.share_ignored: {tracked} is tracked by git; list only ignored "
            "directories (dependencies, build output): the agent gets tracked files from the "
            "frozen snapshot"
        )
    owner = project.stat().st_uid
    shared = []
    for position, name in enumerate(names):
        # Every step, not only the last: a symlinked parent would share what lies elsewhere.
        steps = [project / "/".join(name.split("/")[: i + 1]) for i in range(name.count("/") + 1)]
        try:
            found = [step.lstat() for step in steps]
        except OSError:
            continue  # not made yet in this checkout (say, before npm install): nothing to share
        if any(not stat.S_ISDIR(info.st_mode) or info.st_uid != owner for info in found):
            raise ConfigError(
                f"{origin}: filesystem.share_ignored: {project / name} is not a directory "
                "(a symlink or a file) or not the project owner's; name a real directory of the "
                "project"
            )
        shared.append(SharedDir(path=name, bound=str(root / "shared" / str(position))))
    return tuple(shared)


def _first_tracked(repo: Repo, start: str, names: list[str]) -> str | None:
    """A path of ``start`` at or below one of ``names``, or a non-directory on the way to one
    (a committed symlink ``build -> /etc`` would lead the mount point's creation out of the
    view); None when there is none."""
    literal = {"GIT_LITERAL_PATHSPECS": "1"}
    below = repo.run("ls-tree", "-r", "-z", "--name-only", start, "--", *names, env=literal)
    if below.stdout:
        return os.fsdecode(below.stdout.split(b"\0")[0])
    parents = sorted({str(parent) for name in names for parent in Path(name).parents} - {"."})
    if not parents:
        return None
    # Not recursive: a parent is a tree (fine) or not; what is below it is not listed.
    on_the_way = repo.run("ls-tree", "-z", start, "--", *parents, env=literal).stdout
    for entry in on_the_way.split(b"\0"):
        meta, _, path = entry.partition(b"\t")
        if entry and meta.split(b" ")[1] != b"tree":
            return os.fsdecode(path)
    return None


def _check_owned(repo: Repo, owner: RepoOwner, *, worktree: bool) -> None:
    """Root on a user's repository: git will run as them, so it must be able to write there."""
    foreign = foreign_entries(repo.common_dir, owner.uid)
    if foreign:
        raise ConfigError(
            f"{len(foreign)}{'+' if len(foreign) == 10 else ''} file(s) in {repo.common_dir} do "
            f"not belong to {owner.name}, who owns the repository (first: {foreign[0]}; left by "
            f"an earlier run as root?); Kapsis runs git as {owner.name} here, who could not "
            f"update them; give them back with `sudo chown -R {owner.name}: {repo.common_dir}`"
        )
    if worktree and not Path(owner.home).is_dir():
        raise ConfigError(
            f"worktree mode: the worktree goes under the home of {owner.name}, who owns "
            f"{repo.root}, and {owner.home} is not a directory; use --mode overlay"
        )


def _account_name() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.geteuid())


def _owner_uid(path: Path) -> int | None:
    try:
        return path.stat().st_uid
    except OSError:
        return None


def _finished_worktrees() -> frozenset[Path]:
    """Worktrees of finished agents whose work is committed: safe to remove for a rerun."""
    from kapsis.status import StatusStore

    return frozenset(
        Path(record.work_location)
        for record in StatusStore().all()
        if record.finished
        and record.workspace_mode == "worktree"
        and record.work_location
        and record.error_type not in UNSAVED_ERROR_TYPES
    )


def _user_identity(repo: Repo) -> str | None:
    name = repo.run("config", "user.name", check=False).stdout.decode().strip()
    email = repo.run("config", "user.email", check=False).stdout.decode().strip()
    return f"{name} <{email}>" if name and email else None
