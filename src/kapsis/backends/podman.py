"""The Podman backend: a sandbox is a pod (shared network namespace) holding the agent container.

The pod is where the network gateway sidecar will join the agent later. Rootful, the pod gets a
private uid range (see :mod:`._uidslots`) and the workspace is a host-side overlay; rootless, the
pod keeps the user's id and podman's own overlay volume gives the copy-on-write view.
"""

from __future__ import annotations

import builtins
import json
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kapsis import paths
from kapsis.audit.agent_reports import (
    AUDIT_SOCKET,
    BASH_ENV_FILE,
    BASH_ENV_TARGET,
    REPORTER_TARGET,
    SHELL_REPORTER,
    SOCKET_TARGET,
    TRACE_FIFO,
    TRACE_TARGET,
    install_bash_trace,
    install_shell_reporter,
)
from kapsis.backends import _uidslots
from kapsis.backends.base import Backend, ExitInfo, RunningSandbox, SandboxInfo
from kapsis.backends.podman_gateway import blocked_connections, gateway_run_args, start_gateway
from kapsis.backends.transcript import (
    LOG_FIFO,
    TranscriptPump,
    drain_fifo,
    follow_transcript,
    read_transcript,
)
from kapsis.errors import HostUnsupportedError, ImageError, SandboxError, SandboxStartError
from kapsis.network.gateway_layout import GATEWAY_UIDS
from kapsis.sandbox.host_files import write_host_files
from kapsis.sandbox.plan import SandboxPlan
from kapsis.sandbox.security import apparmor_profile_text, seccomp_profile
from kapsis.sandbox.workspace_plan import AGENT_GIT_TARGET, OBJECTS_TARGET
from kapsis.secrets.delivery import prepare_inbox
from kapsis.secrets.redact import Redactor

if TYPE_CHECKING:
    from kapsis.network.observe import BlockedConnection

PODMAN = "podman"
PODMAN_ERROR = 125  # podman's own failure, before the agent ran
# How long a podman command that stops or removes a pod may take: a pod whose conmon is stuck
# must not hang `kapsis status` or `cleanup` for ever (it is said, and tried again later).
TEARDOWN_TIMEOUT = 90.0
CONMON_OOM_MARKER = "oom"
UID_BASE_PLACEHOLDER = "<host uid range allocated at launch>"


def pod_create_args(plan: SandboxPlan) -> list[str]:
    """The pod groups the sandbox's containers; it has no infra container of its own.

    An infra (pause) container would double the start and teardown time of every run. The
    namespaces are set on the containers instead, and a sidecar that needs the agent's network
    namespace joins it with ``--network container:NAME``.
    """
    args = [PODMAN, "pod", "create", "--name", plan.pod_name, "--infra=false"]
    for key, value in plan.labels.items():
        args += ["--label", f"{key}={value}"]
    return args


def agent_run_args(plan: SandboxPlan, *, detach: bool, uid_base: int | str) -> list[str]:
    """``podman run`` for the agent container, translated from the plan alone."""
    root = Path(plan.workspace.root)
    security, resources = plan.security, plan.resources
    args = [PODMAN, "run", "--pod", plan.pod_name, "--name", plan.container_name, "--pull", "never"]
    # In the foreground podman removes the exited container itself, which leaves an empty pod that
    # is quicker to remove; a detached container stays for `podman wait` in the supervisor. The
    # output goes only to the log pipe (read by the host's transcript pump), never to the client.
    args += ["--detach"] if detach else ["--sig-proxy=true", "--rm", "--attach", "stdin"]
    args += ["--init", "--stop-timeout", "5"]
    for key, value in plan.labels.items():
        args += ["--label", f"{key}={value}"]
    args += ["--network", _agent_network(plan)]
    size, agent = plan.userns.size, plan.userns.agent_uid
    if plan.userns.kind == "mapped":
        args += ["--uidmap", f"0:{uid_base}:{size}", "--gidmap", f"0:{uid_base}:{size}"]
    else:
        args += keep_id_args(agent, size)
    args += ["--user", f"{agent}:{agent}"]
    args += ["--workdir", plan.workdir]
    memory = str(resources.memory_bytes)
    args += ["--memory", memory, "--memory-swap", memory]
    args += ["--cpus", f"{resources.cpus:g}"]
    if resources.pids_limit is not None:
        args += ["--pids-limit", str(resources.pids_limit)]
    if resources.timeout_seconds is not None:
        args += ["--timeout", str(resources.timeout_seconds)]
    if security.drop_all_capabilities:
        args += ["--cap-drop", "ALL"]
    for capability in security.cap_add:
        args += ["--cap-add", capability]
    if security.no_new_privileges:
        args += ["--security-opt", "no-new-privileges"]
    if security.seccomp:
        args += ["--security-opt", f"seccomp={root / 'seccomp.json'}"]
    if security.apparmor_profile:
        args += ["--security-opt", f"apparmor={security.apparmor_profile}"]
    if security.read_only_root:
        # No tmpfs on /run and /var/tmp either: the only writable places are the ones we mount.
        args += ["--read-only", "--read-only-tmpfs=false"]
    for tmpfs in plan.tmpfs:
        args += ["--tmpfs", f"{tmpfs.target}:{','.join(tmpfs.options)}"]
    args += workspace_volume_args(plan)
    for mount in plan.mounts:
        args += ["--volume", f"{mount.source}:{mount.target}:{'ro' if mount.read_only else 'rw'}"]
    if plan.audit_enabled:
        # The agent's side of the audit trail: a socket to report on, never the log itself.
        args += ["--volume", f"{root / AUDIT_SOCKET}:{SOCKET_TARGET}"]
        args += ["--volume", f"{root / SHELL_REPORTER}:{REPORTER_TARGET}:ro"]
        # Every agent's bash traces its commands into a pipe the host reads (BASH_ENV).
        args += ["--volume", f"{root / BASH_ENV_FILE}:{BASH_ENV_TARGET}:ro"]
        args += ["--volume", f"{root / TRACE_FIFO}:{TRACE_TARGET}"]
        args += ["--env", f"KAPSIS_AUDIT_SOCKET={SOCKET_TARGET}"]
    for name, value in plan.env.items():
        args += ["--env", f"{name}={value}"]
    # Secrets are never --env (podman would store them in the container's config on disk): they
    # come through the pipes that the plan's entrypoint reads (see kapsis.secrets.delivery).
    # conmon writes the output into a pipe that the host's transcript pump reads and redacts.
    args += ["--log-driver", "k8s-file", "--log-opt", f"path={root / LOG_FIFO}"]
    args += [plan.image, *plan.entrypoint, *plan.command]
    return args


def keep_id_args(agent: int, size: int, reserved: Iterable[int] = GATEWAY_UIDS) -> list[str]:
    """Rootless: container uid (and gid) ``agent`` is the invoking user, every other container
    id one of the user's subordinate ids, but for the ids of podman's namespace in ``reserved``.

    What ``--userns keep-id:uid=AGENT`` means, spelled as maps, because podman 4.3 refuses any
    ``--userns`` on a container that joins a pod. The ids on the right are those of podman's own
    user namespace, where 0 is the user and 1..N the user's subordinate ids (/etc/subuid).
    ``reserved`` are the uids of the gateway's daemons: a rootless gateway has no map of its
    own, so they are these very ids, and the firewall knows its daemons by them. No container id
    of the agent maps onto one (those few container ids stay unmapped), so no process of the
    agent can ever be taken for the resolver or the proxy, even with CAP_SETUID.
    """
    spans = [(0, 1, agent), (agent, 0, 1), (agent + 1, agent + 1, size - agent - 1)]
    for taken in sorted(set(reserved)):
        cut = []
        for inside, outside, length in spans:
            if outside <= taken < outside + length:
                before = taken - outside
                cut += [
                    (inside, outside, before),
                    (inside + before + 1, taken + 1, length - before - 1),
                ]
            else:
                cut.append((inside, outside, length))
        spans = [span for span in cut if span[2] > 0]
    maps = [f"{inside}:{outside}:{length}" for inside, outside, length in spans]
    return [arg for m in maps for arg in ("--uidmap", m, "--gidmap", m)]


def _agent_network(plan: SandboxPlan) -> str:
    if plan.network.gateway is not None:
        # The gateway owns the namespace; the agent only joins it.
        return f"container:{plan.network.gateway.container_name}"
    return "none" if plan.network.mode == "none" else plan.network.podman_network


def workspace_volume_args(plan: SandboxPlan) -> list[str]:
    """/workspace, plus the agent's git view: its git dir and the project's objects, read-only."""
    workspace = plan.workspace
    mapped = plan.userns.kind == "mapped"
    if mapped or workspace.mode == "worktree" or workspace.base is not None:
        # Rootful: the host mounted the view at ``merged``; rootless: podman's namespace holds
        # the overlay there (mount_rootless); rootless worktree: a plain bind.
        source = workspace.worktree if workspace.mode == "worktree" and not mapped else None
        # nosuid, nodev: a set-uid file or a device node the agent makes is inert.
        args = ["--volume", f"{source or workspace.merged}:{workspace.target}:nosuid,nodev"]
    else:
        # Not a git repository: the project itself is the lower layer (there is no commit to
        # freeze), with podman's own overlay volume.
        overlay = f"O,upperdir={workspace.upper},workdir={workspace.work}"
        args = ["--volume", f"{workspace.project}:{workspace.target}:{overlay}"]
    for shared in workspace.shared:
        # Rootful: bound by the host (idmapped, read-only, checked step by step); rootless:
        # the user's own directory, which podman opens with the user's rights.
        source = shared.bound if mapped else f"{workspace.project}/{shared.path}"
        args += ["--volume", f"{source}:{workspace.target}/{shared.path}:ro"]
    if workspace.agent_git is not None:
        objects = workspace.objects if mapped else workspace.objects_source
        args += ["--volume", f"{workspace.agent_git}:{AGENT_GIT_TARGET}"]
        args += ["--volume", f"{objects}:{OBJECTS_TARGET}:ro"]
    if workspace.gitlink is not None:
        # Covers the worktree's own .git file (which points into the user's repository).
        args += ["--volume", f"{workspace.gitlink}:{workspace.target}/.git:ro"]
    return args


def _run(
    args: list[str],
    *,
    what: str,
    check: bool = True,
    cwd: str | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    return _wait(_start(args, cwd=cwd), what=what, check=check, timeout=timeout)


def _start(args: list[str], *, cwd: str | None = None) -> subprocess.Popen[str]:
    """Start a podman command with its output captured; :func:`_wait` collects it."""
    try:
        return subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd
        )
    except FileNotFoundError:
        raise HostUnsupportedError(
            "podman is not installed; run `kapsis setup --check` for how to install it"
        ) from None


def _wait(
    process: subprocess.Popen[str], *, what: str, check: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise SandboxError(f"{what} did not finish within {timeout:g} s") from None
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check:
        _check(result, what=what)
    return result


def _check(result: subprocess.CompletedProcess[str], *, what: str) -> None:
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no error output"])[-1]
        raise SandboxError(f"{what} failed: {detail}")


class PodmanSandbox(RunningSandbox):
    def __init__(
        self,
        plan: SandboxPlan,
        process: subprocess.Popen[str] | None,
        pump: TranscriptPump | None,
        started_at: float | None = None,
    ) -> None:
        self.plan = plan
        self._process = process
        self._pump = pump
        # Wall-clock seconds, so that a detached supervisor can use the launcher's start time.
        self._started = time.time() if started_at is None else started_at

    def handover(self) -> tuple[int, ...]:
        return (self._pump.read_fd, self._pump.keep_fd) if self._pump is not None else ()

    def wait(self) -> ExitInfo:
        try:
            code, podman_error = self._wait_for_exit()
        finally:
            if self._pump is not None:
                self._pump.finish()
        if code == PODMAN_ERROR:
            _diagnose_start_failure(self.plan, podman_error)
        oom = False
        timed_out = False
        if code >= 128:  # killed by a signal: find out by whom
            oom = self._oom_killed()
            limit = self.plan.resources.timeout_seconds
            elapsed = time.time() - self._started
            timed_out = not oom and limit is not None and elapsed >= limit
        dropped = self._pump.dropped_bytes if self._pump is not None else 0
        return ExitInfo(
            exit_code=code, oom_killed=oom, timed_out=timed_out, transcript_dropped=dropped
        )

    def _wait_for_exit(self) -> tuple[int, str]:
        """The agent's exit code, and podman's own last error line (for exit code 125)."""
        if self._process is not None:
            # Only podman's own messages come here: the agent's output goes to the log pipe.
            _, stderr = self._process.communicate()
            return self._process.returncode, _last_line(stderr)
        result = _run([PODMAN, "wait", self.plan.container_name], what="podman wait")
        return int(result.stdout.strip().splitlines()[-1]), ""

    def _oom_killed(self) -> bool:
        # conmon drops an empty "oom" file into its working directory (the sandbox dir, see
        # launch) when the kernel OOM-kills the container; podman 4.3 does not always read it.
        if (Path(self.plan.workspace.root) / CONMON_OOM_MARKER).exists():
            return True
        if self._process is not None:
            return False  # a foreground container ran with --rm: there is nothing to inspect
        result = _run(
            [PODMAN, "inspect", "--format", "{{.State.OOMKilled}}", self.plan.container_name],
            what="podman inspect",
            check=False,
        )
        return result.stdout.strip() == "true"


def _diagnose_start_failure(plan: SandboxPlan, podman_error: str = "") -> None:
    exists = _run([PODMAN, "image", "exists", plan.image], what="podman image exists", check=False)
    if exists.returncode != 0:
        from kapsis.host.agent_images import build_hint

        raise ImageError(
            f"image {plan.image} is not present; {build_hint(plan.image)} or pass --image"
        )
    detail = f": {podman_error}" if podman_error else ""
    raise SandboxStartError(
        f"podman could not start the agent container in pod {plan.pod_name}{detail}"
    )


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


class PodmanBackend(Backend):
    name = "podman"

    def describe(self, plan: SandboxPlan) -> list[list[str]]:
        commands = [pod_create_args(plan)]
        if plan.network.gateway is not None:
            commands.append(gateway_run_args(plan, uid_base=UID_BASE_PLACEHOLDER))
        commands.append(agent_run_args(plan, detach=False, uid_base=UID_BASE_PLACEHOLDER))
        return commands

    def preflight(self, plan: SandboxPlan) -> None:
        if shutil.which(PODMAN) is None:
            raise HostUnsupportedError(
                "podman is not installed; run `kapsis setup --check` for how to install it"
            )
        if not plan.requires:
            return
        probe = " && ".join(f"command -v {tool} >/dev/null" for tool in plan.requires)
        result = _run(
            [
                PODMAN,
                "run",
                "--rm",
                "--pull",
                "never",
                "--network",
                "none",
                "--entrypoint",
                "sh",
                plan.image,
                "-c",
                probe,
            ],
            what="image check",
            check=False,
        )
        if result.returncode == PODMAN_ERROR:
            _diagnose_start_failure(plan)
        if result.returncode != 0:
            missing = ", ".join(plan.requires)
            from kapsis.host.agent_images import build_hint

            raise ImageError(
                f"image {plan.image} lacks {missing}, which agent '{plan.agent}' needs; "
                f"{build_hint(plan.image)} or pass --image"
            )

    def launch(self, plan: SandboxPlan, *, attach: bool, redactor: Redactor) -> RunningSandbox:
        root = paths.private_dir(Path(plan.workspace.root))
        paths.private_dir(paths.logs_dir())
        # The pod needs nothing prepared here, so podman (~35 ms of its own start-up) creates it
        # while the host side is set up; a failure of either is reported after both are done,
        # and the caller's remove() then takes the pod away.
        pod_create = _start(pod_create_args(plan))
        try:
            uid_base = self._prepare_host(plan, root)
        finally:
            created = _wait(pod_create, what="podman pod create", check=False)
        _check(created, what="podman pod create")
        if plan.network.gateway is not None:
            start_gateway(plan, uid_base)
        args = agent_run_args(plan, detach=not attach, uid_base=uid_base)
        # Reading before conmon writes: it opens the log pipe when it starts the container.
        pump = TranscriptPump.open(
            root / LOG_FIFO, paths.transcript_path(plan.agent_id), redactor, echo=attach
        )
        if attach:
            pump.start()
            try:
                process = subprocess.Popen(
                    args,
                    cwd=root,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            except FileNotFoundError:
                pump.finish()
                raise HostUnsupportedError("podman is not installed") from None
            return PodmanSandbox(plan, process, pump)
        result = _run(args, what="podman run", check=False, cwd=str(root))
        if result.returncode != 0:
            pump.close()
            if result.returncode == PODMAN_ERROR:
                _diagnose_start_failure(plan, _last_line(result.stderr))
            raise SandboxError(f"podman run failed: {result.stderr.strip()}")
        # Not pumped here: the launcher hands the pipe over to the supervisor (handover()); what
        # the agent writes meanwhile waits in the kernel's pipe buffer.
        return PodmanSandbox(plan, None, pump)

    def _prepare_host(self, plan: SandboxPlan, root: Path) -> int | str:
        """Files, LSM profile, uid range and workspace; returns the uid base (rootful) or ""."""
        if plan.spec_source is not None:
            # A snapshot: the agent sees the spec as it was at launch, read-only.
            shutil.copyfile(plan.spec_source, root / "task-spec.md")
        if plan.security.seccomp:
            (root / "seccomp.json").write_text(json.dumps(seccomp_profile()))
        if plan.audit_enabled:
            install_shell_reporter(root / SHELL_REPORTER)
            install_bash_trace(root)
        write_host_files(plan)
        if plan.security.apparmor_profile:
            _load_apparmor(plan.security.apparmor_profile)
        uid_base: int | str = ""
        if plan.userns.kind == "mapped":
            uid_base = _uidslots.claim(plan.agent_id, is_live=_pod_exists)
            agent_host_id = uid_base + plan.userns.agent_uid
            from kapsis.workspace import mount_workspace

            mount_workspace(plan.workspace, agent_host_id, agent_host_id)
        elif plan.workspace.mode == "overlay" and plan.workspace.base is not None:
            from kapsis.workspace.overlay import mount_rootless

            mount_rootless(plan.workspace, PODMAN)
        if plan.secrets:
            owner = uid_base + plan.userns.agent_uid if isinstance(uid_base, int) else None
            prepare_inbox(root, plan.secrets, owner)
        return uid_base

    def attach_to(
        self,
        plan: SandboxPlan,
        started_at: float | None = None,
        *,
        handover: tuple[int, ...] = (),
        redactor: Redactor | None = None,
    ) -> RunningSandbox:
        pump = None
        if len(handover) == 2:
            transcript = paths.transcript_path(plan.agent_id)
            pump = TranscriptPump(
                handover[0], handover[1], transcript, redactor or Redactor(()), echo=False
            ).start()
        return PodmanSandbox(plan, None, pump, started_at)

    def blocked_connections(
        self, plan: SandboxPlan
    ) -> tuple[builtins.list[BlockedConnection], bool]:
        return blocked_connections(plan)

    def stop(self, agent_id: str, grace_seconds: int = 5) -> None:
        _run(
            [PODMAN, "pod", "stop", "--time", str(grace_seconds), f"kapsis-{agent_id}"],
            what="podman pod stop",
            check=False,
            timeout=grace_seconds + TEARDOWN_TIMEOUT,
        )

    def stop_unsupervised(self, agent_id: str) -> None:
        # conmon's log is a FIFO whose reader died with the supervisor: conmon then blocks
        # opening it again, holding the container's lock, and every podman command on the pod
        # hangs. A drain takes the reader's place until the pod has stopped. What it drains is
        # dropped: the secret values that redact it died with the supervisor.
        with drain_fifo(paths.sandbox_dir(agent_id) / LOG_FIFO):
            self.stop(agent_id, grace_seconds=0)

    def logs(self, agent_id: str, *, follow: bool) -> Iterator[str]:
        transcript = paths.transcript_path(agent_id)
        if follow:
            return follow_transcript(transcript, still_running=lambda: _container_running(agent_id))
        return read_transcript(transcript)

    def list(self) -> list[SandboxInfo]:
        result = _run(
            [PODMAN, "pod", "ps", "--filter", "label=io.kapsis.agent-id", "--format", "json"],
            what="podman pod ps",
        )
        pods = json.loads(result.stdout or "[]")
        return [
            SandboxInfo(
                agent_id=(pod.get("Labels") or {}).get("io.kapsis.agent-id", ""),
                name=pod.get("Name", ""),
                state=pod.get("Status", ""),
            )
            for pod in pods
        ]

    def remove(self, plan: SandboxPlan) -> None:
        for attempt in range(3):
            result = _run(
                [PODMAN, "pod", "rm", "--force", "--time", "0", "--ignore", plan.pod_name],
                what="podman pod rm",
                check=False,
                timeout=TEARDOWN_TIMEOUT,
            )
            if result.returncode == 0:
                break
            time.sleep(0.2 * (attempt + 1))  # "device or resource busy" clears after a moment
        if plan.userns.kind == "mapped":
            from kapsis.workspace import unmount_workspace

            unmount_workspace(plan.workspace)
            _uidslots.release(plan.agent_id)
        elif plan.workspace.mode == "overlay":
            if plan.workspace.base is not None:
                from kapsis.workspace.overlay import unmount_rootless

                unmount_rootless(plan.workspace, PODMAN)
            _remove_overlay_scratch(Path(plan.workspace.work))


def _remove_overlay_scratch(work: Path) -> None:
    """Rootless: remove the scratch dir overlayfs made inside ``work`` as the container's root.

    It belongs to a subordinate uid, so the user could not delete their own sandbox dir later.
    Empty (as overlayfs leaves it), its parent's owner removes it; else podman's user namespace,
    where the user is root over those ids, does.
    """
    scratch = work / "work"
    try:
        scratch.rmdir()
    except FileNotFoundError:
        return
    except OSError:
        remove = [PODMAN, "unshare", "rm", "-rf", "--", str(scratch)]
        _run(remove, what="podman unshare", check=False)


def _pod_exists(agent_id: str) -> bool:
    result = _run(
        [PODMAN, "pod", "exists", f"kapsis-{agent_id}"], what="podman pod exists", check=False
    )
    return result.returncode == 0


def _container_running(agent_id: str) -> bool:
    result = _run(
        [PODMAN, "inspect", "--format", "{{.State.Running}}", f"kapsis-{agent_id}-agent"],
        what="podman inspect",
        check=False,
    )
    return result.stdout.strip() == "true"


def _load_apparmor(profile_name: str) -> None:
    parser = shutil.which("apparmor_parser")
    if parser is None:
        raise HostUnsupportedError(
            "security profile 'paranoid' needs apparmor_parser; install the apparmor package"
        )
    result = subprocess.run(
        [parser, "--replace", "--write-cache"],
        input=apparmor_profile_text(profile_name),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise HostUnsupportedError(
            f"cannot load AppArmor profile {profile_name}: {result.stderr.strip()}"
        )
