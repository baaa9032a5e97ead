"""The agent's view is frozen at launch and its commit holds only its own work (real sandboxes).

A user keeps coding while agents run: nothing they (or a script) do to the checkout after launch
may reach a running agent, in either workspace mode, and the agent's commit must hold the
agent's lines only. Ignored directories reach the agent only through filesystem.share_ignored,
read-only and live (the documented trade-off). The shared base is reused and reclaimed.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from kapsis.errors import ExitCode

from .frozen import EDIT, FROZEN_TASK, edit_once_started
from .kapsis_runner import Kapsis

pytestmark = pytest.mark.integration


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    )
    return result.stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    subprocess.run(["git", "init", "-q", "-b", "main", str(root)], check=True)
    git(root, "config", "user.name", "Ada Tester")
    git(root, "config", "user.email", "ada@example.test")
    (root / "base.txt").write_text("base\n")
    (root / ".gitignore").write_text("node_modules/\nsecret.env\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "initial")
    return root


def run_json(kapsis: Kapsis, repo: Path, task: str, *flags: str) -> dict[str, Any]:
    result = kapsis.run(repo, task, "--json", "--network-mode", "none", *flags, timeout=180)
    assert result.stdout, result.stderr
    payload: dict[str, Any] = json.loads(result.stdout)
    payload["returncode"] = result.returncode
    payload["stderr"] = result.stderr
    return payload


def agent_diff(repo: Path, branch: str) -> list[str]:
    """The lines of base.txt that the branch's last commit (the agent's) adds or removes."""
    patch = git(repo, "diff", "--unified=0", f"{branch}~1", branch, "--", "base.txt")
    return [
        line
        for line in patch.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


@pytest.mark.parametrize("mode", ["overlay", "worktree"])
def test_an_edit_made_during_the_run_never_reaches_the_agent_or_its_branch(
    kapsis: Kapsis, repo: Path, mode: str
) -> None:
    def edit() -> None:
        with (repo / "base.txt").open("a") as handle:
            handle.write(EDIT)

    with edit_once_started(kapsis.home, edit) as edited:
        result = run_json(kapsis, repo, FROZEN_TASK, "--mode", mode)

    assert edited.is_set(), "the agent never said it started"
    assert result["returncode"] == 0, result["stderr"]
    branch = result["branch"]
    assert git(repo, "show", f"{branch}:after.txt") == "base\n"
    assert git(repo, "show", f"{branch}:base.txt") == "base\nagent\n"
    assert agent_diff(repo, branch) == ["+agent"]
    # The user's edit stays theirs, in the checkout, untouched by the run.
    assert (repo / "base.txt").read_text() == "base\n" + EDIT


@pytest.mark.parametrize("setting", ["include", "exclude"])
def test_control_the_same_edit_made_before_launch(
    kapsis: Kapsis, repo: Path, tmp_path: Path, setting: str
) -> None:
    (repo / "base.txt").write_text("base\n" + EDIT)
    config = tmp_path / "uncommitted.yaml"
    config.write_text(f"filesystem:\n  uncommitted: {setting}\n")

    result = run_json(kapsis, repo, FROZEN_TASK, "--config", str(config))

    assert result["returncode"] == 0, result["stderr"]
    branch = result["branch"]
    seen = git(repo, "show", f"{branch}:after.txt")
    # The agent's own commit holds its line only, in both settings.
    assert agent_diff(repo, branch) == ["+agent"]
    subjects = git(repo, "log", "--format=%s", f"main..{branch}").splitlines()
    if setting == "include":
        assert seen == "base\n" + EDIT  # seen: the user's state at launch
        assert subjects[1].startswith("Uncommitted work of ")
        assert git(repo, "show", f"{branch}:base.txt") == "base\n" + EDIT + "agent\n"
    else:
        assert seen == "base\n"  # left out, and not on the branch
        assert len(subjects) == 1
        assert git(repo, "show", f"{branch}:base.txt") == "base\nagent\n"


def test_ten_agents_started_while_a_script_rewrites_the_checkout_each_see_their_launch_state(
    kapsis: Kapsis, repo: Path
) -> None:
    names = [f"f{index}.txt" for index in range(5)]
    for name in names:
        (repo / name).write_text("generation 0\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "files")
    stop = threading.Event()
    generations = [0]

    def rewrite() -> None:
        while not stop.is_set():
            generations[0] += 1
            for name in names:
                partial = repo / f".{name}.partial"
                partial.write_text(f"generation {generations[0]}\n" * 200)
                os.replace(partial, repo / name)
            time.sleep(0.005)

    # Each agent reads every file, waits while the script goes on, and reads them again.
    task = "cat f*.txt > first.seen; sleep 2; cat f*.txt > second.seen"
    writer = threading.Thread(target=rewrite, daemon=True)
    writer.start()
    try:
        with ThreadPoolExecutor(max_workers=10) as pool:
            results = list(
                pool.map(
                    lambda i: run_json(kapsis, repo, task, "--agent-id", f"frz{i}",
                                       "--mode", "worktree" if i % 3 == 0 else "overlay",
                                       # Ten of the default 10g need 100 GB free: less each.
                                       "--disk", "1g"),
                    range(10),
                )
            )  # fmt: skip
    finally:
        stop.set()
        writer.join()
    assert generations[0] > 20, "the script did not keep rewriting during the launches"
    for result in results:
        assert result["returncode"] == 0, result["stderr"]
        branch = result["branch"]
        launch_state = git(repo, "rev-parse", f"{branch}~1").strip()  # the carried state
        expected = "".join(git(repo, "show", f"{launch_state}:{name}") for name in names)
        first = git(repo, "show", f"{branch}:first.seen")
        assert first == expected
        assert git(repo, "show", f"{branch}:second.seen") == first
        # One generation per file, whole: never a torn or a mixed file.
        for name in names:
            content = git(repo, "show", f"{launch_state}:{name}").splitlines()
            assert len(content) in (1, 200) and len(set(content)) == 1


def test_ignored_files_reach_the_agent_only_through_share_ignored(
    kapsis: Kapsis, repo: Path, tmp_path: Path
) -> None:
    (repo / "node_modules" / "lib").mkdir(parents=True)
    (repo / "node_modules" / "lib" / "index.js").write_text("v1\n")
    (repo / "secret.env").write_text("TOKEN=s3cret\n")
    task = (
        "ls node_modules/lib/index.js secret.env 2>&1 | sort > seen.txt; "
        "echo x > node_modules/new.js 2>> seen.txt || echo write-refused >> seen.txt; true"
    )

    plain = run_json(kapsis, repo, task)
    assert plain["returncode"] == 0, plain["stderr"]
    seen = git(repo, "show", f"{plain['branch']}:seen.txt")
    # Frozen view: ignored files are not in it (the control below shares one directory).
    assert "No such file" in seen and "s3cret" not in seen
    assert "ls: cannot access 'secret.env'" in seen

    config = tmp_path / "share.yaml"
    config.write_text("filesystem:\n  share_ignored: [node_modules, not_made_yet]\n")
    live_task = (
        f"cat node_modules/lib/index.js > first.txt; touch {'started-marker'}; sleep 4; "
        "cat node_modules/lib/index.js > after.txt; "
        "(echo x > node_modules/new.js) 2> refused.txt; rm started-marker; ls secret.env "
        "2> hidden.txt; true"
    )

    def update_dependency() -> None:
        (repo / "node_modules" / "lib" / "index.js").write_text("v2\n")

    for mode in ("overlay", "worktree"):
        (repo / "node_modules" / "lib" / "index.js").write_text("v1\n")
        with edit_once_started(kapsis.home, update_dependency) as updated:
            shared = run_json(kapsis, repo, live_task, "--config", str(config), "--mode", mode)
        assert updated.is_set()
        assert shared["returncode"] == 0, shared["stderr"]
        branch = shared["branch"]
        assert git(repo, "show", f"{branch}:first.txt") == "v1\n"
        assert git(repo, "show", f"{branch}:after.txt") == "v2\n"  # live: the trade-off
        assert "Read-only file system" in git(repo, "show", f"{branch}:refused.txt")
        assert "No such file" in git(repo, "show", f"{branch}:hidden.txt")
        assert not (repo / "node_modules" / "new.js").exists()
        files = git(repo, "ls-tree", "-r", "--name-only", branch).split()
        assert not any(name.startswith("node_modules") for name in files)


def test_share_ignored_refuses_tracked_and_symlinked_directories(
    kapsis: Kapsis, repo: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private.txt").write_text("not the project's\n")
    (repo / "vendor").symlink_to(outside)  # ignored, so it is not carried as a symlink
    with (repo / ".gitignore").open("a") as ignore:
        ignore.write("vendor\n")
    (repo / "web").mkdir()
    (repo / "web" / "tracked.js").write_text("tracked\n")
    (repo / "build").symlink_to(outside)  # committed: a mount point below it would follow it
    git(repo, "add", "web", "build", ".gitignore")
    git(repo, "commit", "-q", "-m", "web")
    cases = (
        ("web", "is tracked by git"),
        ("build/out", "build is tracked by git"),
        ("vendor", "is not a directory"),
    )
    for entry, says in cases:
        config = tmp_path / f"{entry.replace('/', '-')}.yaml"
        config.write_text(f"filesystem:\n  share_ignored: [{entry}]\n")
        result = kapsis.run(repo, "cat vendor/private.txt", "--config", str(config))
        assert result.returncode == ExitCode.USAGE, result.stderr
        assert says in result.stderr
    assert not (outside / "out").exists()


def test_the_base_is_made_once_reused_and_reclaimed_by_cleanup(kapsis: Kapsis, repo: Path) -> None:
    first = kapsis.run(repo, "echo one > one.txt", "--network-mode", "none")
    assert first.returncode == 0, first.stderr
    assert "first launch on this project" in first.stderr
    (repo / "base.txt").write_text("changed, not committed\n")
    second = kapsis.run(repo, "cat base.txt", "--network-mode", "none")
    assert second.returncode == 0, second.stderr
    assert "first launch" not in second.stderr  # the same base, a one-file delta above it
    assert "changed, not committed" in second.stdout
    bases = list((kapsis.home / "bases").glob("*/*.index"))
    assert len(bases) == 1

    dry = kapsis("cleanup", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove base" in dry.stdout and " MB, " in dry.stdout
    assert Path(str(bases[0]).removesuffix(".index")).is_dir()
    done = kapsis("cleanup")
    assert done.returncode == 0, done.stderr
    assert "removed base" in done.stdout
    assert not list((kapsis.home / "bases").glob("*/*"))
