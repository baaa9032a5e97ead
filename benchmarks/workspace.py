"""Workspace-ready time for a ~10 MB and a ~1 GB repository, in overlay and worktree mode.

    sudo python benchmarks/workspace.py [--runs 5] [--small-mb 10] [--large-mb 1000] [--changed 100]

"Ready" is what the host does before the agent's container starts: plan (which reads the user's
uncommitted state and carries it as a commit), create the agent's branch,
write its git view, check out the worktree (worktree mode) or the delta layer (overlay mode, when
needed), and mount the workspace. Prints the median of several runs per repository and mode, and
the ratio large / small (the target for overlay: <= 1.5). Each case is measured twice: on a clean
checkout, and with ``--changed`` files of the checkout modified and not committed (a user at
work). The first launch of each case is printed on its own, not in the median: in overlay mode on
the clean checkout it is the project's first launch, which checks out the frozen base that later
launches share (kapsis.workspace.bases); elsewhere it runs with cold caches. Then the disk the
bases take, and the cost of the disk quota (resources.disk: the workspace on an ext4 filesystem
of its own, made and mounted at launch): ready time with the default 10g quota and with
``disk: null``, per mode, and the time to release the disk at the end; and what the disk helper
of rootless runs costs (make and release through sudo, against the same as root). Last, the cost of
filesystem.hide on the large repository: ready time with the default patterns against
``hide: []``, with no file to hide and with one tracked ``.env``. Needs root (mounts). Not a
test.
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


def change_files(repo: Path, count: int) -> None:
    """Modify ``count`` tracked files of the checkout without committing them."""
    for path in sorted(repo.glob("dir*/file*.bin"))[:count]:
        with path.open("ab") as handle:
            handle.write(b"a change the user has not committed\n")


def restore(repo: Path) -> None:
    subprocess.run(["git", "-C", str(repo), "checkout", "-q", "--", "."], check=True)


def ready_time(
    repo: Path,
    mode: str,
    run: int,
    no_quota: Path | None = None,
    released: list[float] | None = None,
) -> float:
    """Seconds to get the workspace ready; ``no_quota``: a config file with ``disk: null``;
    ``released`` gets the seconds the quota's disk took to go."""
    from kapsis import api
    from kapsis.backends import _uidslots
    from kapsis.sandbox.plan import RunRequest
    from kapsis.workspace import mount_workspace, unmount_workspace
    from kapsis.workspace.disk import release_disk
    from kapsis.workspace.prepare import abandon_workspace, prepare_workspace

    request = RunRequest(
        project=repo, task="true", agent_id=f"bench-{mode}-{run}", mode=mode, config_file=no_quota
    )
    # Planning reads the user's uncommitted state (filesystem.uncommitted) and, when there is
    # some, makes the commit that carries it: part of getting ready.
    started = time.perf_counter()
    plan = api.plan(request)
    uid = _uidslots.BASE + 1000
    prepare_workspace(plan)
    mount_workspace(plan.workspace, uid, uid)
    elapsed = time.perf_counter() - started
    unmount_workspace(plan.workspace)
    if released is not None:
        started = time.perf_counter()
        release_disk(plan.workspace)
        released.append(time.perf_counter() - started)
    abandon_workspace(plan)
    subprocess.run(["rm", "-rf", plan.workspace.root], check=True)
    return elapsed


def quota_cost(repo: Path, runs: int, scratch: Path) -> None:
    """Ready time with the default quota against none, on the same repository, per mode."""
    no_quota = scratch / "no-quota.yaml"
    no_quota.write_text("resources:\n  disk: null\n")
    for mode in ("overlay", "worktree"):
        ready_time(repo, mode, -2)  # warm
        released: list[float] = []
        with_quota, without = [], []
        for run in range(runs):
            with_quota.append(ready_time(repo, mode, 100 + run, released=released))
            without.append(ready_time(repo, mode, 200 + run, no_quota))
        quota, plain = statistics.median(with_quota), statistics.median(without)
        print(
            f"disk quota {mode:>8}: ready {quota * 1000:7.1f} ms with 10g, {plain * 1000:7.1f} ms "
            f"without (ratio {quota / plain:.2f}, +{(quota - plain) * 1000:.1f} ms); releasing "
            f"the disk {statistics.median(released) * 1000:.1f} ms (medians of {runs})"
        )


def helper_cost(runs: int, scratch: Path) -> None:
    """Rootless runs get their disk from the disk helper, through sudo: making and releasing a
    10g disk that way, against the same done in-process as root (what a rootful run does)."""
    from kapsis.workspace.disk import MKFS, helper
    from kapsis.workspace.disk_helper import INSTALLED_AT

    if not INSTALLED_AT.is_file():
        print("disk helper: not installed (sudo bash scripts/install_disk_helper.sh)")
        return
    through_sudo, in_process = [], []
    for run in range(runs):
        started = time.perf_counter()
        helper("make", f"bench-helper-{run}", str(10 * 1024**3))
        helper("release", f"bench-helper-{run}")
        through_sudo.append(time.perf_counter() - started)
        image, target = scratch / f"direct-{run}.img", scratch / f"direct-{run}"
        started = time.perf_counter()
        with image.open("wb") as file:
            file.truncate(10 * 1024**3)
        target.mkdir()
        subprocess.run([*MKFS, str(image)], check=True)
        subprocess.run(["mount", "-o", "loop,nosuid,nodev", str(image), str(target)], check=True)
        subprocess.run(["umount", str(target)], check=True)
        image.unlink()
        target.rmdir()
        in_process.append(time.perf_counter() - started)
    helper_median, direct_median = statistics.median(through_sudo), statistics.median(in_process)
    print(
        f"disk helper: make + release of a 10g disk {helper_median * 1000:7.1f} ms through sudo, "
        f"{direct_median * 1000:7.1f} ms as root in-process (ratio "
        f"{helper_median / direct_median:.2f}; medians of {runs})"
    )


def hide_cost(repo: Path, runs: int, scratch: Path) -> None:
    """Ready time with the default hide patterns against none, per mode: with nothing to hide
    (what they cost to look), then with a tracked .env (what hiding costs)."""
    no_quota = scratch / "no-quota-hide.yaml"
    no_quota.write_text("resources:\n  disk: null\n")
    no_hide = scratch / "no-hide.yaml"
    no_hide.write_text("resources:\n  disk: null\nfilesystem:\n  hide: []\n")
    git = ["git", "-C", str(repo)]
    for case in ("nothing to hide", "a tracked .env"):
        if case == "a tracked .env":
            (repo / ".env").write_text("TOKEN=secret\n")
            subprocess.run([*git, "add", ".env"], check=True)
            subprocess.run([*git, "commit", "-q", "-m", "env"], check=True)
        for mode in ("overlay", "worktree"):
            ready_time(repo, mode, -3, no_quota)  # warm (and, in overlay mode, a base)
            hiding = [ready_time(repo, mode, 300 + run, no_quota) for run in range(runs)]
            plain = [ready_time(repo, mode, 400 + run, no_hide) for run in range(runs)]
            with_hide, without = statistics.median(hiding), statistics.median(plain)
            print(
                f"hide, {case:>15}, {mode:>8}: ready {with_hide * 1000:7.1f} ms with the default "
                f"patterns, {without * 1000:7.1f} ms with none (ratio {with_hide / without:.2f}, "
                f"+{(with_hide - without) * 1000:.1f} ms; medians of {runs})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--small-mb", type=int, default=10)
    parser.add_argument("--large-mb", type=int, default=1000)
    parser.add_argument("--changed", type=int, default=100, help="files changed, not committed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kapsis-bench-ws-") as scratch:
        os.environ["KAPSIS_HOME"] = str(Path(scratch) / "home")
        print(f"building a {args.small_mb} MB and a {args.large_mb} MB repository ...", flush=True)
        repos = {size: make_repo(Path(scratch), size) for size in (args.small_mb, args.large_mb)}
        medians: dict[tuple[str, str, int], float] = {}
        for state in ("clean", f"{args.changed} changed"):
            for mode in ("overlay", "worktree"):
                for size, repo in repos.items():
                    if state != "clean":
                        change_files(repo, args.changed)
                    first = ready_time(repo, mode, -1)  # cold caches: the first launch
                    samples = [ready_time(repo, mode, run) for run in range(args.runs)]
                    if state != "clean":
                        restore(repo)
                    medians[(state, mode, size)] = statistics.median(samples)
                    spread = f"{min(samples) * 1000:.1f}-{max(samples) * 1000:.1f}"
                    print(
                        f"{state:>11} {mode:>8} {size:>5} MB: median "
                        f"{medians[(state, mode, size)] * 1000:8.1f} ms over {args.runs} runs "
                        f"(range {spread} ms); first launch {first * 1000:.1f} ms",
                        flush=True,
                    )
        for state in ("clean", f"{args.changed} changed"):
            for mode in ("overlay", "worktree"):
                large = medians[(state, mode, args.large_mb)]
                ratio = large / medians[(state, mode, args.small_mb)]
                target = " (target <= 1.5)" if mode == "overlay" else ""
                print(
                    f"{state:>11} {mode:>8} ratio {args.large_mb} MB / {args.small_mb} MB = "
                    f"{ratio:.2f}{target}"
                )
        from kapsis.workspace import bases

        for record in bases.records():
            print(
                f"base of {Path(record.project).name} at {record.commit[:12]}: {record.files} "
                f"files, {record.bytes / 1e6:.1f} MB, made in {record.seconds:.2f} s"
            )
        clean = medians[("clean", "overlay", args.large_mb)]
        changed = medians[(f"{args.changed} changed", "overlay", args.large_mb)]
        print(f"overlay {args.large_mb} MB: {args.changed} changed / clean = {changed / clean:.2f}")
        quota_cost(repos[args.small_mb], args.runs, Path(scratch))
        helper_cost(args.runs, Path(scratch))
        hide_cost(repos[args.large_mb], args.runs, Path(scratch))


if __name__ == "__main__":
    main()
