"""Run the real ``kapsis`` command in a subprocess, isolated in a test's own KAPSIS_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Kapsis:
    home: Path
    config_dir: Path
    image: str

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {
            **os.environ,
            "KAPSIS_HOME": str(self.home),
            "KAPSIS_CONFIG_DIR": str(self.config_dir),
            **(extra or {}),
        }

    def __call__(
        self, *args: str, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kapsis", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(env),
            stdin=subprocess.DEVNULL,
        )

    def run(
        self, project: Path, task: str, *flags: str, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        return self("run", str(project), "--image", self.image, "--task", task, *flags, **kwargs)

    def status(self, agent_id: str) -> dict[str, Any]:
        result = self("status", agent_id, "--json")
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    def wait_finished(self, agent_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.status(agent_id)
            if record["phase"] in ("complete", "failed"):
                return record
            time.sleep(0.3)
        raise AssertionError(f"agent {agent_id} did not finish within {timeout}s")
