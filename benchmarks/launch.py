"""Launch overhead of ``kapsis run`` against bare ``podman run``, measured in the same run.

    python benchmarks/launch.py [--runs 10] [--image localhost/kapsis-base:latest] [--no-rootless]

Prints the median wall time of each, over interleaved warm runs, with the spread (quartiles and
extremes: a busy machine widens it), and their ratio. ``kapsis run`` is measured as a user meets
it, through the start-up server that the first command starts (kapsis.forkserver), and again with
``KAPSIS_NO_SERVER=1``, where every run imports Kapsis afresh. Not a test: the figures depend on
the machine; the issue's target is a ratio <= 2.5 on 2 cores.

Run as root, it also measures rootless podman beside rootful: as a throwaway user it makes (the
test suite's tests/integration/rootless_user.py; the images are loaded into the user's storage
first), bare ``podman run`` and ``kapsis run``, both started through ``runuser`` so the two pay the
same switch of user. Run as a normal user, every figure is rootless already.
"""

from __future__ import annotations

import os
import sys

# benchmarks/operator.py shares its name with the standard library's ``operator``: this folder
# must not come first on the path (as it does for ``python benchmarks/NAME.py``).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import compileall  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def timed(command: list[str], env: dict[str, str], cwd: Path | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(
        command,
        check=True,
        env=env or None,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def report(samples: dict[str, list[float]]) -> dict[str, float]:
    medians = {name: statistics.median(values) for name, values in samples.items()}
    for name, value in medians.items():
        values = sorted(samples[name])
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        print(
            f"{name:>24}: median {value * 1000:7.1f} ms over {len(values)} runs "
            f"(min {values[0] * 1000:.0f}, p25 {quartiles[0] * 1000:.0f}, "
            f"p75 {quartiles[2] * 1000:.0f}, max {values[-1] * 1000:.0f})"
        )
    return medians


def rootless(args: argparse.Namespace) -> dict[str, list[float]]:
    """Bare podman run and kapsis run as a throwaway user (rootless podman), interleaved."""
    sys.path.insert(0, str(Path(_HERE).parent))
    from tests.integration.rootless_user import (
        SYSTEM_PYTHON,
        host_settings_for_rootless,
        rootless_user,
        skip_reason,
    )

    reason = skip_reason()
    if reason:
        print(f"rootless: not measured ({reason})")
        return {}
    gateway = "localhost/kapsis-gateway:latest"
    with host_settings_for_rootless(), rootless_user([args.image, gateway]) as user:
        project = user.make_repository(user.home / "project")
        base = ["runuser", "-u", user.name, "--", "env", "-i"]
        env = {**user.environment(), "KAPSIS_HOME": str(user.home / "bench-home")}
        env.pop("PYTHONDONTWRITEBYTECODE")  # the bytecode root compiled is read, not rewritten
        as_user = [*base, *(f"{key}={value}" for key, value in env.items())]
        bare = [*as_user, "podman", "run", "--rm", "--network=none", args.image, "true"]
        kapsis_run = [
            *as_user, SYSTEM_PYTHON, "-m", "kapsis", "run", str(project), "--agent", "shell",
            "--task", "true", "--network-mode", "none", "--image", args.image,
        ]  # fmt: skip
        status = [*as_user, SYSTEM_PYTHON, "-m", "kapsis", "server", "status"]
        for command in (bare, kapsis_run):
            timed(command, {}, cwd=user.home)
        for _ in range(100):
            if subprocess.run(status, capture_output=True, cwd=user.home).returncode == 0:
                break
            time.sleep(0.1)
        samples: dict[str, list[float]] = {
            "rootless bare podman run": [],
            "rootless kapsis run": [],
        }
        try:
            for _ in range(args.runs):
                samples["rootless bare podman run"].append(timed(bare, {}, cwd=user.home))
                samples["rootless kapsis run"].append(timed(kapsis_run, {}, cwd=user.home))
        finally:
            subprocess.run([*status[:-1], "stop"], capture_output=True, cwd=user.home)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--image", default="localhost/kapsis-base:latest")
    parser.add_argument(
        "--no-rootless", action="store_true", help="as root: skip the rootless measurement"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kapsis-bench-") as scratch:
        project = Path(scratch) / "project"
        project.mkdir()
        (project / "README.md").write_text("benchmark\n")
        env = {
            **os.environ,
            "KAPSIS_HOME": str(Path(scratch) / "home"),
            # A start-up server of its own, stopped at the end.
            "KAPSIS_RUNTIME_DIR": str(Path(scratch) / "run"),
        }
        # An installed Kapsis has its bytecode compiled (pip does it at install time). From a
        # source checkout under PYTHONDONTWRITEBYTECODE every run would compile the changed
        # modules again and measure the compiler, not the launch.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        import kapsis

        compileall.compile_dir(Path(kapsis.__file__).parent, quiet=1)
        kapsis = [
            sys.executable,
            "-m",
            "kapsis",
            "run",
            str(project),
            "--agent",
            "shell",
            "--task",
            "true",
            "--network-mode",
            "none",
            "--image",
            args.image,
        ]
        no_server_env = {**env, "KAPSIS_NO_SERVER": "1"}
        bare = ["podman", "run", "--rm", "--network=none", args.image, "true"]
        python_start = [sys.executable, "-c", "pass"]
        kapsis_import = [
            sys.executable,
            "-c",
            "import kapsis.cli.app, kapsis.api, kapsis.backends.podman",
        ]

        for command in (bare, kapsis):  # warm caches; the first kapsis command starts a server
            timed(command, env)
        server_status = [sys.executable, "-m", "kapsis", "server", "status"]
        for _ in range(100):
            if subprocess.run(server_status, env=env, capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            sys.exit("the start-up server did not come up; see " + env["KAPSIS_RUNTIME_DIR"])
        samples: dict[str, list[float]] = {
            "bare podman run": [],
            "kapsis run": [],
            "no server": [],
            "python start": [],
            "kapsis imports": [],
        }
        try:
            for _ in range(args.runs):
                samples["bare podman run"].append(timed(bare, env))
                samples["kapsis run"].append(timed(kapsis, env))
                samples["no server"].append(timed(kapsis, no_server_env))
                samples["python start"].append(timed(python_start, env))
                samples["kapsis imports"].append(timed(kapsis_import, env))
        finally:
            subprocess.run([*server_status[:-1], "stop"], env=env, capture_output=True)

    medians = report(samples)
    ratio = medians["kapsis run"] / medians["bare podman run"]
    mode = "rootful" if os.geteuid() == 0 else "rootless"
    print(f"{'ratio':>24}: kapsis run / bare podman run = {ratio:.2f} ({mode}; target <= 2.5)")
    cold = medians["no server"] / medians["bare podman run"]
    print(f"{'':>24}  without the start-up server (KAPSIS_NO_SERVER=1): {cold:.2f}")
    if os.geteuid() != 0 or args.no_rootless:
        return
    rootless_medians = report(rootless(args))
    if rootless_medians:
        bare, kapsis = (
            rootless_medians["rootless bare podman run"],
            rootless_medians["rootless kapsis run"],
        )
        print(f"{'rootless ratio':>24}: kapsis run / bare podman run = {kapsis / bare:.2f}")
        print(
            f"{'rootless / rootful':>24}: kapsis run {kapsis / medians['kapsis run']:.2f}, "
            f"bare podman run {bare / medians['bare podman run']:.2f}"
        )


if __name__ == "__main__":
    main()
