"""Audit trail throughput: records appended per second and verified per second.

    python benchmarks/audit.py [--records 20000] [--runs 5]

Appends through :class:`kapsis.audit.AuditLog` (each append takes the file lock, hashes the
canonical record and writes one line; seals every 1000 records) and verifies the result with
:func:`kapsis.audit.verify`. Prints the median of ``--runs`` runs. Targets on the project's
machines: >= 20,000 appends/s and >= 200,000 verified records/s. Not a test.
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
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    appends: list[float] = []
    verifies: list[float] = []
    with tempfile.TemporaryDirectory(prefix="kapsis-bench-audit-") as scratch:
        os.environ["KAPSIS_HOME"] = scratch
        from kapsis.audit import AuditLog, rotated_files, verify
        from kapsis.audit.keys import signing_key

        key = signing_key().public_key()
        for run in range(args.runs):
            log = AuditLog(f"bench{run}", directory=Path(scratch))
            log.record("session_start", project="/bench")
            start = time.perf_counter()
            for index in range(args.records):
                log.record(
                    "command", source="agent", command=f"make test {index}", cwd="/workspace"
                )
            appends.append(args.records / (time.perf_counter() - start))
            log.record("session_end", phase="complete")
            files = rotated_files(log.path)
            start = time.perf_counter()
            result = verify(files, key)
            verifies.append(result.records / (time.perf_counter() - start))
            assert result.ok, result.damage
    print(
        f"  appended: median {statistics.median(appends):10,.0f} records/s over {args.runs} runs"
        f" (target >= 20,000)"
    )
    print(
        f"  verified: median {statistics.median(verifies):10,.0f} records/s over {args.runs} runs"
        f" (target >= 200,000)"
    )


if __name__ == "__main__":
    main()
