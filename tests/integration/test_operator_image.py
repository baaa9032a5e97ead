"""The operator image: built without network from the base image, it runs the finishing step.

The step runs as it does in a Pod: uid 993, no capabilities, read-only root, no network, the
workspace (owned by the agent's uid 1000) mounted read-only, and pushes to a bare repository in
a mounted directory.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from kapsis.host.operator_image import build_operator_image
from kapsis.k8s.inpod import clone as clone_step
from kapsis.k8s.layout import AGENT_UID, FINISHER_UID, STEP_CONFIG_ENV, StepConfig
from kapsis.k8s.names import AGENT_EXIT_ANNOTATION

pytestmark = pytest.mark.integration
IMAGE = "localhost/kapsis-operator:integration-test"
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "T",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "T",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}


def _git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(
        ["git", "-c", "safe.directory=*", *args],
        cwd=cwd,
        env=GIT_ENV,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture(scope="module")
def operator_image(base_image: str) -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root: the test hands files to the Pod's uids 1000 and 993")
    build_operator_image(IMAGE, base=base_image, progress=lambda line: print(f"[operator] {line}"))
    yield IMAGE
    subprocess.run(["podman", "rmi", "-f", IMAGE], capture_output=True, check=False)


def test_finisher_runs_in_the_operator_image(operator_image: str, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    remote = tmp_path / "remote.git"
    _git("init", "--bare", "-b", "main", str(remote))
    seed = tmp_path / "seed"
    _git("clone", str(remote), str(seed))
    (seed / "README.md").write_text("hello\n")
    _git("add", "-A", cwd=seed)
    _git("commit", "-m", "seed", cwd=seed)
    _git("push", "origin", "HEAD:main", cwd=seed)

    pod = tmp_path / "pod"
    workspace, trusted, info = pod / "workspace", pod / "kapsis", pod / "info"
    for path in (workspace, trusted, info):
        path.mkdir(parents=True)
    config = StepConfig(
        request="it", url=str(remote), branch="kapsis/it", message="shell: it\n",
        wait_timeout_seconds=30,
    )  # fmt: skip
    clone_step.clone(
        config, workspace=workspace, trusted_volume=trusted, secret_dir=pod / "none",
        scratch=tmp_path / "scratch", agent_uid=AGENT_UID, finisher_uid=FINISHER_UID,
    )  # fmt: skip
    clone_step.hand_over(remote, FINISHER_UID)  # the finisher's uid pushes into it
    (workspace / "work.txt").write_text("done\n")
    os.chown(workspace / "work.txt", AGENT_UID, AGENT_UID)
    (info / "annotations").write_text(f'{AGENT_EXIT_ANNOTATION}="0"\n')
    (pod / "termination-log").write_text("")
    os.chown(pod / "termination-log", FINISHER_UID, FINISHER_UID)

    result = subprocess.run(
        [
            "podman", "run", "--rm", "--network", "none", "--read-only", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", "--user", f"{FINISHER_UID}:{FINISHER_UID}",
            "--tmpfs", "/tmp:rw,nosuid,nodev", "-e", "HOME=/tmp",
            "-e", f"{STEP_CONFIG_ENV}={config.to_env()}",
            "-v", f"{tmp_path}:{tmp_path}",
            "-v", f"{workspace}:/workspace:ro", "-v", f"{trusted}:/kapsis",
            "-v", f"{info}:/etc/kapsis-pod:ro",
            "-v", f"{pod / 'termination-log'}:/dev/termination-log",
            operator_image, "python3", "-m", "kapsis.k8s.inpod.finish",
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((pod / "termination-log").read_text())
    assert report["pushStatus"] == "verified", report
    assert report["commitSha"] == _git("rev-parse", "refs/heads/kapsis/it", cwd=remote)
    assert _git("show", f"{report['commitSha']}:work.txt", cwd=remote) == "done"
