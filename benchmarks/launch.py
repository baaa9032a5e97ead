"""Launch overhead of ``kapsis run`` against bare ``podman run``, measured in the same run.

    python benchmarks/launch.py [--runs 10] [--image localhost/kapsis-base:latest]

Prints the median wall time of each, over interleaved warm runs, with the spread (quartiles and
extremes: a busy machine widens it), and their ratio. Not a test: the figures depend on the
machine; the issue's target is a ratio <= 2.5 on 2 cores.
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


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--image", default="localhost/kapsis-base:latest")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kapsis-bench-") as scratch:
        project = Path(scratch) / "project"
        project.mkdir()
        (project / "README.md").write_text("benchmark\n")
        env = {**os.environ, "KAPSIS_HOME": str(Path(scratch) / "home")}
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
        bare = ["podman", "run", "--rm", "--network=none", args.image, "true"]
        python_start = [sys.executable, "-c", "pass"]
        kapsis_import = [
            sys.executable,
            "-c",
            "import kapsis.cli.app, kapsis.api, kapsis.backends.podman",
        ]

        for command in (bare, kapsis):  # warm caches and the pause image
            timed(command, env)
        samples: dict[str, list[float]] = {
            "bare podman run": [],
            "kapsis run": [],
            "python start": [],
            "kapsis imports": [],
        }
        for _ in range(args.runs):
            samples["bare podman run"].append(timed(bare, env))
            samples["kapsis run"].append(timed(kapsis, env))
            samples["python start"].append(timed(python_start, env))
            samples["kapsis imports"].append(timed(kapsis_import, env))

    medians = {name: statistics.median(values) for name, values in samples.items()}
    for name, value in medians.items():
        values = sorted(samples[name])
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        print(
            f"{name:>16}: median {value * 1000:7.1f} ms over {args.runs} runs "
            f"(min {values[0] * 1000:.0f}, p25 {quartiles[0] * 1000:.0f}, "
            f"p75 {quartiles[2] * 1000:.0f}, max {values[-1] * 1000:.0f})"
        )
    ratio = medians["kapsis run"] / medians["bare podman run"]
    print(f"{'ratio':>16}: kapsis run / bare podman run = {ratio:.2f} (target <= 2.5)")


if __name__ == "__main__":
    main()
