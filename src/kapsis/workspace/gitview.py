"""The agent's own git view: one branch, no hooks or credentials of the user's, read-only history.

The agent's ``/workspace/.git`` is a gitlink to ``/kapsis/git``, a small git directory the host
writes into the sandbox dir: a minimal config (none of the user's settings, remotes or
credential helpers), ``HEAD`` on the agent's branch, that one ref, an index of the start commit,
and an ``alternates`` entry that borrows the project's objects, mounted read-only at
``/kapsis/objects``. The agent can commit, branch and diff as usual; whatever it writes stays in
its sandbox dir, and the host only ever reads it as data (see :mod:`kapsis.git.agent_commits`).
"""

from __future__ import annotations

from pathlib import Path

from kapsis.git.owner import copy_owned_file
from kapsis.git.runner import Repo
from kapsis.sandbox.workspace_plan import AGENT_GIT_TARGET, OBJECTS_TARGET

GITLINK_TEXT = f"gitdir: {AGENT_GIT_TARGET}\n"


def agent_git_config(agent: str, agent_id: str) -> str:
    # checkStat=minimal: the files reach the agent through an idmapped mount, so owner and
    # inode differ from what an index written on the host would record.
    return (
        "[core]\n"
        "\trepositoryformatversion = 0\n"
        "\tfilemode = true\n"
        "\tbare = false\n"
        "\tlogallrefupdates = true\n"
        "\tcheckStat = minimal\n"
        "\ttrustctime = false\n"
        "[gc]\n"
        "\tauto = 0\n"
        "[user]\n"
        f"\tname = Kapsis agent {agent}\n"
        f"\temail = {agent_id}@agents.kapsis.invalid\n"
    )


def _reusable_index(repo: Repo, index: Path | None, start: str) -> bool:
    """Whether ``index`` (a checkout's index) describes exactly ``start``'s tree.

    Copying it gives the agent an index with real stat data, so its first ``git status`` does
    not re-read every file, and it costs far less than building one from the tree. A split
    index points at other files and cannot be copied alone.
    """
    if index is None or not index.is_file() or any(index.parent.glob("sharedindex.*")):
        return False
    check = repo.run(
        "diff-index", "--cached", "--quiet", start, env={"GIT_INDEX_FILE": str(index)}, check=False
    )
    return check.returncode == 0


def build_agent_git(
    repo: Repo,
    agent_git: Path,
    *,
    branch: str,
    start: str,
    agent: str,
    agent_id: str,
    checkout_index: Path | None = None,
) -> None:
    """Write the agent's git directory for ``branch`` at ``start``.

    ``checkout_index`` is the index of the checkout the agent will see (the project's, or the
    worktree's); it is copied when it matches ``start``, else an index is built from the tree.
    """
    ref = agent_git / "refs" / "heads" / branch
    ref.parent.mkdir(parents=True, exist_ok=True)
    (agent_git / "refs" / "tags").mkdir(parents=True, exist_ok=True)
    (agent_git / "objects" / "pack").mkdir(parents=True, exist_ok=True)
    (agent_git / "objects" / "info").mkdir(parents=True, exist_ok=True)
    (agent_git / "info").mkdir(exist_ok=True)
    (agent_git / "HEAD").write_text(f"ref: refs/heads/{branch}\n")
    (agent_git / "config").write_text(agent_git_config(agent, agent_id))
    (agent_git / "description").write_text("The agent's view of the project (kapsis).\n")
    ref.write_text(f"{start}\n")
    (agent_git / "objects" / "info" / "alternates").write_text(f"{OBJECTS_TARGET}\n")
    index = agent_git / "index"
    if not (
        _reusable_index(repo, checkout_index, start) and _copy_index(repo, checkout_index, index)
    ):
        # The index is Kapsis's own file, in its (root-only) sandbox dir: nothing of the
        # repository is written.
        repo.run("read-tree", start, env={"GIT_INDEX_FILE": str(index)}, as_owner=False)


def _copy_index(repo: Repo, source: Path | None, target: Path) -> bool:
    """Copy a checkout's index into the agent's view; False (build one instead) when it is not
    a plain file of the repository's owner."""
    if source is None:
        return False
    return copy_owned_file(source, target, repo.owner.uid if repo.owner is not None else None)


def write_gitlink(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(GITLINK_TEXT)
