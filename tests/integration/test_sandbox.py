"""The hardened Podman sandbox, observed from inside real containers.

Every attack here is paired with a control: the same probe where it is allowed, so a failure
proves the control and not a broken test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kapsis.errors import ExitCode

from .kapsis_runner import Kapsis

pytestmark = pytest.mark.integration


def status_field(output: str, name: str) -> str:
    for line in output.splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{name} not in output:\n{output}")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "README.md").write_text("# sample\n")
    (root / "src" / "app.py").write_text("print('hello')\n")
    return root


PROC_STATUS = "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; id -u"


@pytest.mark.parametrize(
    ("profile", "cap_bounding_zero", "no_new_privs"),
    [("minimal", False, "0"), ("standard", True, "1"), ("strict", True, "1")],
)
def test_profile_capabilities_nnp_and_seccomp(
    kapsis: Kapsis, project: Path, profile: str, cap_bounding_zero: bool, no_new_privs: str
) -> None:
    result = kapsis.run(project, PROC_STATUS, "--security-profile", profile)
    assert result.returncode == 0, result.stderr
    assert status_field(result.stdout, "CapEff") == "0000000000000000"
    assert (status_field(result.stdout, "CapBnd") == "0000000000000000") is cap_bounding_zero
    assert status_field(result.stdout, "NoNewPrivs") == no_new_privs
    assert status_field(result.stdout, "Seccomp") == "2"
    assert result.stdout.strip().splitlines()[-1] == "1000", "the agent must not run as root"


@pytest.mark.parametrize(
    ("profile", "allowed"), [("minimal", True), ("standard", False), ("strict", False)]
)
def test_new_user_namespace_is_refused_by_the_seccomp_filter(
    kapsis: Kapsis, project: Path, profile: str, allowed: bool
) -> None:
    # A user namespace is the first step of most container escapes; minimal is the control.
    result = kapsis.run(
        project, "unshare --user --map-root-user id -u", "--security-profile", profile
    )
    if allowed:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "0"
    else:
        assert result.returncode == ExitCode.AGENT_FAILED
        assert "Operation not permitted" in result.stderr


def test_pids_limit_stops_a_fork_loop(kapsis: Kapsis, project: Path) -> None:
    fork_loop = (
        "python3 -c 'import os, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(400):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(5); os._exit(0)\n"
        "        n += 1\n"
        "except OSError:\n"
        "    pass\n"
        'print("started=%d" % n)\''
    )
    limited = kapsis.run(project, fork_loop, "--security-profile", "strict")
    control = kapsis.run(project, fork_loop, "--security-profile", "minimal")
    started_limited = int(limited.stdout.split("started=")[1].split()[0])
    started_control = int(control.stdout.split("started=")[1].split()[0])
    assert started_control == 400
    assert started_limited < 256


def test_memory_limit_oom_kills_a_hog_and_the_run_says_so(kapsis: Kapsis, project: Path) -> None:
    hog = "python3 -c 'x = bytearray(300 * 1024 * 1024); print(len(x))'"
    killed = kapsis.run(project, hog, "--memory", "64m", "--agent-id", "hog")
    assert killed.returncode == ExitCode.KILLED, killed.stderr
    record = kapsis.status("hog")
    assert record["error_type"] == "oom"
    assert record["phase"] == "failed"
    assert "out of memory" in killed.stderr
    # The end of the run is whole: the audit chain sealed, the sandbox gone.
    assert kapsis("audit", "verify", "hog").returncode == 0
    assert subprocess.run(["podman", "pod", "exists", "kapsis-hog"]).returncode != 0
    control = kapsis.run(project, hog, "--memory", "1g")
    assert control.returncode == 0, control.stderr
    assert control.stdout.strip() == str(300 * 1024 * 1024)


def test_strict_root_filesystem_is_read_only(kapsis: Kapsis, project: Path) -> None:
    probe = "touch /var/tmp/probe && echo wrote"
    strict = kapsis.run(project, probe, "--security-profile", "strict")
    standard = kapsis.run(project, probe, "--security-profile", "standard")
    assert strict.returncode == ExitCode.AGENT_FAILED
    assert "Read-only file system" in strict.stderr
    assert standard.returncode == 0 and standard.stdout.strip() == "wrote"


def test_strict_tmp_is_noexec(kapsis: Kapsis, project: Path) -> None:
    probe = "cp /bin/true /tmp/t && /tmp/t && echo ran"
    strict = kapsis.run(project, probe, "--security-profile", "strict")
    standard = kapsis.run(project, probe, "--security-profile", "standard")
    assert strict.returncode == ExitCode.AGENT_FAILED
    assert "Permission denied" in strict.stderr
    assert standard.stdout.strip() == "ran"


def test_host_files_outside_the_workspace_are_not_visible(
    kapsis: Kapsis, project: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("do not read")
    (project / "in-project.txt").write_text("visible")
    probe = (
        f"cat {secret} 2>&1; ls {kapsis.home} 2>&1; cat /workspace/in-project.txt; "
        "test -e /var/lib/containers && echo HOST-STORAGE-VISIBLE; echo done"
    )
    result = kapsis.run(project, probe)
    assert result.returncode == 0, result.stderr
    assert "do not read" not in result.stdout
    assert "No such file or directory" in result.stdout
    assert "visible" in result.stdout, "control: the project itself is visible at /workspace"
    assert "HOST-STORAGE-VISIBLE" not in result.stdout


def test_host_project_is_unchanged_after_the_agent_writes(kapsis: Kapsis, project: Path) -> None:
    before = {p.relative_to(project): p.read_bytes() for p in project.rglob("*") if p.is_file()}
    task = (
        "echo changed >> /workspace/README.md && rm /workspace/src/app.py && "
        "echo new > /workspace/new.txt && mkdir -p /workspace/d && echo x > /workspace/d/y && "
        "cat /workspace/README.md"
    )
    result = kapsis.run(project, task, "--agent-id", "writer")
    assert result.returncode == 0, result.stderr
    assert "changed" in result.stdout, "the agent saw its own write"
    after = {p.relative_to(project): p.read_bytes() for p in project.rglob("*") if p.is_file()}
    assert after == before
    upper = Path(kapsis.status("writer")["work_location"])
    assert (upper / "new.txt").read_text() == "new\n"
    assert (upper / "README.md").read_text().endswith("changed\n")
    assert (upper / "src" / "app.py").exists(), "the deletion is recorded as a whiteout"


def test_spec_file_is_at_a_fixed_read_only_path(
    kapsis: Kapsis, project: Path, tmp_path: Path
) -> None:
    spec = tmp_path / "task.md"
    spec.write_text("# Fix the bug\n\nDetails here.\n")
    result = kapsis(
        "run",
        str(project),
        "--image",
        kapsis.image,
        "--spec",
        str(spec),
        "--config",
        str(
            _write_config(
                tmp_path,
                'agent:\n  command: \'cat "$KAPSIS_TASK_SPEC"; '
                "echo x >> /task-spec.md || echo read-only'\n",
            )
        ),
    )
    assert result.returncode == 0, result.stderr
    assert "# Fix the bug" in result.stdout
    assert "read-only" in result.stdout


def _write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent-sandbox.yaml"
    path.write_text(text)
    return path


def test_timeout_stops_the_agent_with_its_own_exit_code(kapsis: Kapsis, project: Path) -> None:
    result = kapsis.run(project, "sleep 60", "--timeout", "2", "--agent-id", "slow")
    assert result.returncode == ExitCode.TIMEOUT, result.stderr
    assert kapsis.status("slow")["error_type"] == "timeout"


def test_agent_failure_exit_code_is_reported(kapsis: Kapsis, project: Path) -> None:
    result = kapsis.run(project, "exit 7", "--agent-id", "fails")
    assert result.returncode == ExitCode.AGENT_FAILED
    record = kapsis.status("fails")
    assert record["agent_exit_code"] == 7
    assert record["exit_code"] == ExitCode.AGENT_FAILED


def test_detach_status_logs_and_stop(kapsis: Kapsis, project: Path) -> None:
    started = kapsis.run(project, "echo started; sleep 120", "--detach", "--agent-id", "bg")
    assert started.returncode == 0, started.stderr
    assert kapsis.status("bg")["phase"] == "running"
    logs = kapsis("logs", "bg")
    for _ in range(20):
        if "started" in logs.stdout:
            break
        logs = kapsis("logs", "bg")
    assert "started" in logs.stdout
    stopped = kapsis("stop", "bg")
    assert stopped.returncode == 0, stopped.stderr
    record = kapsis.wait_finished("bg")
    assert record["phase"] == "failed"
    assert record["error_type"] == "stopped"
    assert record["exit_code"] == ExitCode.KILLED
    pods = subprocess.run(["podman", "pod", "exists", "kapsis-bg"], check=False)
    assert pods.returncode != 0, "the pod is removed after the run"


def test_missing_image_is_a_sandbox_error(kapsis: Kapsis, project: Path) -> None:
    result = kapsis(
        "run", str(project), "--image", "localhost/kapsis-no-such-image:1", "--task", "true"
    )
    assert result.returncode == ExitCode.SANDBOX_FAILED
    assert "kapsis setup --build" in result.stderr


def test_agent_whose_cli_the_image_lacks_fails_clearly(kapsis: Kapsis, project: Path) -> None:
    result = kapsis.run(project, "hello", "--agent", "claude", env={"ANTHROPIC_API_KEY": "sk-x"})
    assert result.returncode == ExitCode.SANDBOX_FAILED
    assert "lacks claude" in result.stderr


def test_paranoid_refuses_on_a_host_without_apparmor(kapsis: Kapsis, project: Path) -> None:
    from kapsis.host.facts import probe_host

    if probe_host().apparmor:
        pytest.skip("this host has AppArmor; the refusal path cannot be shown here")
    result = kapsis.run(project, "true", "--security-profile", "paranoid")
    assert result.returncode == ExitCode.HOST_UNSUPPORTED
    assert "AppArmor" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_network_none_has_only_loopback_and_open_has_an_interface(
    kapsis: Kapsis, project: Path
) -> None:
    probe = "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\\n' ' '"
    none = kapsis.run(project, probe, "--network-mode", "none")
    opened = kapsis.run(project, probe, "--network-mode", "open")
    assert none.stdout.split() == ["lo"]
    assert len(opened.stdout.split()) > 1, opened.stderr
    assert "WARNING: network mode OPEN" in opened.stderr


def test_two_agents_on_one_project_do_not_see_each_other(kapsis: Kapsis, project: Path) -> None:
    first = kapsis.run(
        project,
        "echo one > /workspace/mine.txt; sleep 3; cat /workspace/mine.txt",
        "--detach",
        "--agent-id",
        "one",
    )
    second = kapsis.run(
        project,
        "echo two > /workspace/mine.txt; sleep 3; cat /workspace/mine.txt",
        "--detach",
        "--agent-id",
        "two",
    )
    assert first.returncode == 0 and second.returncode == 0
    assert kapsis.wait_finished("one")["phase"] == "complete"
    assert kapsis.wait_finished("two")["phase"] == "complete"
    assert list(kapsis("logs", "one").stdout.split()) == ["one"]
    assert list(kapsis("logs", "two").stdout.split()) == ["two"]
    assert not (project / "mine.txt").exists()


def test_run_json_reports_the_result(kapsis: Kapsis, project: Path) -> None:
    result = kapsis.run(project, "echo agent-output", "--json")
    assert result.returncode == 0
    payload = json.loads(result.stdout)
    assert payload["exit_code"] == 0
    assert "agent-output" in result.stderr, "with --json the agent's output goes to stderr"


def test_cleanup_removes_finished_agents_but_keeps_audit(kapsis: Kapsis, project: Path) -> None:
    kapsis.run(project, "true", "--agent-id", "done1")
    dry = kapsis("cleanup", "--dry-run")
    assert "would remove done1" in dry.stdout
    assert (kapsis.home / "status" / "done1.json").exists()
    real = kapsis("cleanup")
    assert "removed done1" in real.stdout
    assert not (kapsis.home / "status" / "done1.json").exists()
    assert not (kapsis.home / "sandboxes" / "done1").exists()
    assert (kapsis.home / "audit" / "done1.jsonl").exists()


PTRACE_PROBE = (
    "python3 -c 'import ctypes, os\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "result = libc.ptrace(0, 0, 0, 0)\n"  # PTRACE_TRACEME: the first step of tracing
    'print("ptrace", result, os.strerror(ctypes.get_errno()) if result else "ok")\''
)


@pytest.mark.parametrize(("profile", "allowed"), [("minimal", True), ("standard", False)])
def test_ptrace_is_refused_by_the_seccomp_filter(
    kapsis: Kapsis, project: Path, profile: str, allowed: bool
) -> None:
    result = kapsis.run(project, PTRACE_PROBE, "--security-profile", profile)
    assert result.returncode == 0, result.stderr
    if allowed:
        assert result.stdout.strip() == "ptrace 0 ok"
    else:
        assert result.stdout.strip() == "ptrace -1 Operation not permitted"
