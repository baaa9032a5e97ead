#!/usr/bin/env bash
# Install (without the demo), then lint, type-check and run the whole test suite.
# Exits non-zero when any step fails, and when pytest collects no tests at all.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/install.sh --no-demo

failed=()

echo "==> ruff check src tests"
.venv/bin/ruff check src tests || failed+=(ruff)

echo "==> mypy"
.venv/bin/mypy || failed+=(mypy)

echo "==> pytest -q"
status=0
.venv/bin/pytest -q || status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests" >&2
    failed+=("pytest (no tests)")
elif [ "$status" -ne 0 ]; then
    failed+=("pytest (exit $status)")
fi

if [ "${#failed[@]}" -gt 0 ]; then
    printf 'test.sh: FAILED: %s\n' "${failed[*]}" >&2
    exit 1
fi
echo "==> all checks passed"
