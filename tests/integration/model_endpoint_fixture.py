"""The scripted model endpoint (:mod:`.model_endpoint`) in the test internet, for one module.

It runs in the test internet's network namespace on an address of its own (:data:`STUB_V4`,
port 80), and the test DNS gives it two names: :data:`ENDPOINT_HOST`, which no profile allows,
so a run reaches it only because ``agent.endpoint`` names it; and ``api.anthropic.com``, the
claude profile's own API host. Every agent plays the same script: write :data:`FILE_PATH` with
:data:`CONTENT`, then say it is done. Nothing listens on the address's other ports: an
endpoint on port :data:`REFUSED_PORT` refuses every connection.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .internet import DEFAULT_NAMES, Internet, _die_with_parent

STUB_V4 = "198.51.100.3"  # a second address of the test internet's host, for the endpoint alone
ENDPOINT_HOST = "models.example.test"
REFUSED_PORT = 81
FILE_PATH = "/workspace/hello.txt"
CONTENT = "hello from the model\n"
_REPOSITORY = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ModelEndpoint:
    log: Path  # one JSON line per request (model_endpoint/server.py)

    def mark(self) -> int:
        """Where the log stands now: pass it to :meth:`requests` to see what came after."""
        return len(self.log.read_text().splitlines())

    def requests(self, since: int = 0) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()[since:]]


@pytest.fixture(scope="module")
def model_endpoint(
    internet: Internet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelEndpoint]:
    """Up for one test module at a time: its address and names go when the module ends, so no
    other module's test of the internet's routes or names sees them."""
    log = tmp_path_factory.mktemp("model-endpoint") / "requests.jsonl"
    log.touch()
    serve = [sys.executable, "-m", "tests.integration.model_endpoint", "serve",
             STUB_V4, "80", str(log), FILE_PATH, CONTENT]  # fmt: skip
    with internet.serve_address(STUB_V4):
        server = subprocess.Popen(
            ["ip", "netns", "exec", internet.netns, *serve],
            cwd=_REPOSITORY,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
            names = {"api.anthropic.com": (STUB_V4,), ENDPOINT_HOST: (STUB_V4,)}
            internet.set_names({**DEFAULT_NAMES, **names})
            yield ModelEndpoint(log)
        finally:
            internet.set_names(DEFAULT_NAMES)
            server.terminate()
            server.wait(timeout=5)
