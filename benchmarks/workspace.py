"""Workspace-ready time for a ~10 MB and a ~1 GB repository, in overlay and worktree mode.

    sudo python benchmarks/workspace.py [--runs 5] [--small-mb 10] [--large-mb 1000]

"Ready" is what the host does before the agent's container starts: create the agent's branch,
write its git view, check out the worktree (worktree mode) or the delta layer (overlay mode, when
needed), and mount the workspace. Prints the median of several runs per repository and mode, and
the ratio large / small (the target for overlay: <= 1.5). Needs root (mounts). Not a test.
"""

from __future__ import annotations

import os
import sys

# benchmarks/operator.py shares its name with the standard library's ``operator``: this folder
# must not come first on the path (as it does for ``python benchmarks/NAME.py``).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

FILE_SIZE = 100 * 1024  # a realistic mix would vary; the file count scales with the size


def make_repo(root: Path, megabytes: int) -> Path:
    repo = root / f"repo-{megabytes}mb"
    repo.mkdir()
    files = max(1, megabytes * 1024 * 1024 // FILE_SIZE)
    for index in range(files):
        directory = repo / f"dir{index // 100:03d}"
        directory.mkdir(exist_ok=True)
        (directory / f"file{index:05d}.bin").write_bytes(os.urandom(FILE_SIZE))
    git = ["git", "-C", str(repo), "-c", "core.compression=0", "-c", "core.looseCompression=0"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run([*git, "config", "user.name", "Bench"], check=True)
    subprocess.run([*git, "config", "user.email", "bench@example.test"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "content"], check=True)
    return repo


def ready_time(repo: Path, mode: str, run: int) -> float:
    from kapsis import api
    from kapsis.backends import _uidslots
    from kapsis.sandbox.plan import RunRequest
    from kapsis.workspace import mount_workspace, unmount_workspace
    from kapsis.workspace.prepare import abandon_workspace, prepare_workspace

    request = RunRequest(project=repo, task="true", agent_id=f"bench-{mode}-{run}", mode=mode)
    plan = api.plan(request)
    uid = _uidslots.BASE + 1000
    started = time.perf_counter()
    prepare_workspace(plan)
    mount_workspace(plan.workspace, uid, uid)
    elapsed = time.perf_counter() - started
    unmount_workspace(plan.workspace)
    abandon_workspace(plan)
    subprocess.run(["rm", "-rf", plan.workspace.root], check=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--small-mb", type=int, default=10)
    parser.add_argument("--large-mb", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kapsis-bench-ws-") as scratch:
        os.environ["KAPSIS_HOME"] = str(Path(scratch) / "home")
        print(f"building a {args.small_mb} MB and a {args.large_mb} MB repository ...", flush=True)
        repos = {size: make_repo(Path(scratch), size) for size in (args.small_mb, args.large_mb)}
        medians: dict[tuple[str, int], float] = {}
        for mode in ("overlay", "worktree"):
            for size, repo in repos.items():
                ready_time(repo, mode, -1)  # warm the page cache and git's
                samples = [ready_time(repo, mode, run) for run in range(args.runs)]
                medians[(mode, size)] = statistics.median(samples)
                spread = f"{min(samples) * 1000:.1f}-{max(samples) * 1000:.1f}"
                print(
                    f"{mode:>8} {size:>5} MB: median {medians[(mode, size)] * 1000:8.1f} ms "
                    f"over {args.runs} runs (range {spread} ms)",
                    flush=True,
                )
        for mode in ("overlay", "worktree"):
            ratio = medians[(mode, args.large_mb)] / medians[(mode, args.small_mb)]
            target = " (target <= 1.5)" if mode == "overlay" else ""
            print(f"{mode:>8} ratio {args.large_mb} MB / {args.small_mb} MB = {ratio:.2f}{target}")


if __name__ == "__main__":
    main()
