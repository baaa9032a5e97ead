"""Shared by every test layer: the start-up servers of this test session are its own."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def private_startup_servers() -> Iterator[None]:
    """Commands the tests run (``python -m kapsis``) go through a start-up server, as a user's
    do; it lives in a directory of this session's and is stopped when the session ends, so no
    server outlives the tests or serves another run's code."""
    from kapsis.forkserver import control

    with tempfile.TemporaryDirectory(prefix="kapsis-test-run-") as directory:
        previous = os.environ.get("KAPSIS_RUNTIME_DIR")
        os.environ["KAPSIS_RUNTIME_DIR"] = directory
        try:
            yield
        finally:
            control.stop_all()
            if previous is None:
                del os.environ["KAPSIS_RUNTIME_DIR"]
            else:
                os.environ["KAPSIS_RUNTIME_DIR"] = previous
