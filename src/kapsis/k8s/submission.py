"""A local run request and its config, turned into the objects ``kapsis run --backend k8s`` creates.

Pure data, no cluster: the same :class:`~kapsis.sandbox.plan.RunRequest` and the same loaded
``agent-sandbox.yaml`` as a local run become an ``AgentRequest`` (and, for ``--spec``, the
ConfigMap holding the task). Keys that only mean something on this machine (host mounts, host
secrets, Podman's network, host-side hooks) are refused with the key and the fix, never dropped:
a policy that silently vanished on the way to the cluster would be a weaker sandbox than the
user asked for. Every key of :class:`~kapsis.config.models.KapsisConfig` is listed either in
:data:`MAPPED_KEYS` or in :data:`LOCAL_ONLY`, and a unit test keeps it that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kapsis.agents import AgentProfile
from kapsis.config.loader import KeyPath, LoadedConfig
from kapsis.config.models import KapsisConfig, NetworkPolicySection
from kapsis.errors import ConfigError
from kapsis.git.branches import auto_branch_name, check_branch_name
from kapsis.git.runner import Repo
from kapsis.k8s import names
from kapsis.k8s.resource import (
    GROUP,
    KIND,
    MAX_CA_BUNDLE,
    VERSION,
    AgentRequestSpec,
    AgentSpec,
    CaBundleSpec,
    ConfigMapKeyRef,
    EnvironmentSpec,
    GitWorkspace,
    ResourcesSpec,
    SecretKeyRef,
    TaskSpec,
    WorkspaceSpec,
)

# The sandbox's own helpers give --task/--spec and agent.command exactly their local meaning.
from kapsis.sandbox.ca_bundle import bundle_file, bundle_text
from kapsis.sandbox.network_plan import check_flag_entry
from kapsis.sandbox.plan import (
    RunRequest,
    agent_command,
    check_agent_id,
    fits_one_string,
    task_of,
    task_summary,
)

TASK_KEY = "task.md"

# Keys (prefixes of key paths) that reach the AgentRequest.
MAPPED_KEYS: frozenset[KeyPath] = frozenset(
    {
        ("agent", "name"),
        ("agent", "command"),
        ("agent", "args"),
        ("agent", "endpoint"),
        ("agent", "model"),
        ("image", "name"),
        ("resources", "memory"),
        ("resources", "cpus"),
        ("resources", "timeout"),
        ("security", "profile"),
        ("security", "overrides", "read_only_root"),
        ("security", "overrides", "no_new_privileges"),
        ("security", "overrides", "seccomp"),
        ("security", "overrides", "cap_add"),
        ("network", "mode"),
        ("network", "allowlist"),
        ("network", "dns_servers"),
        ("network", "dns"),
        ("network", "ca_bundle"),
        ("git", "branch"),
        ("git", "base_branch"),
        ("git", "auto_push"),
        ("git", "remote"),
        ("environment", "set"),
        ("kubernetes",),
    }
)

_SECRET_FIX = (
    "use a Kubernetes Secret reference: kubernetes.secrets.{name}: {name: SECRET, key: KEY}"
)
_NOT_YET = "the Kubernetes backend does not support it; remove it for --backend k8s"

# Keys that cannot mean anything on a cluster (or that the AgentRequest cannot carry): a value
# other than the default is refused with this fix. ``{name}`` is the first entry's name.
LOCAL_ONLY: dict[KeyPath, str] = {
    ("resources", "idle_timeout"): _NOT_YET,
    ("resources", "idle_action"): _NOT_YET,
    ("resources", "disk"): "a cluster run's workspace is an emptyDir, whose size the cluster "
    "limits (its ephemeral-storage); remove resources.disk (and --disk) for --backend k8s",
    ("resources", "pids"): "Kubernetes limits processes per Pod only, in the kubelet's "
    "configuration (podPidsLimit); set it there and remove resources.pids for --backend k8s",
    ("security", "overrides", "noexec_tmp"): "a Pod's /tmp is an emptyDir, which cannot be "
    "mounted noexec; remove the override for --backend k8s",
    ("agent", "workdir"): "the agent works in the clone at /workspace; " + _NOT_YET,
    ("filesystem", "mode"): "a cluster run's workspace is a fresh clone on an emptyDir, neither "
    "an overlay nor a worktree of this machine; remove it (and --mode) for --backend k8s",
    ("filesystem", "uncommitted"): "a cluster run clones the pushed branch: your uncommitted "
    "changes never reach it; remove filesystem.uncommitted for --backend k8s",
    ("filesystem", "share_ignored"): "a cluster run clones the pushed branch: no directory of "
    "your checkout reaches it; remove filesystem.share_ignored for --backend k8s",
    # Only committed files reach a cluster run (no file of the checkout that git ignores), and
    # the clone is not filtered yet: a value other than the default is refused.
    ("filesystem", "hide"): "a cluster run clones the pushed branch, and hides no tracked file "
    "of it yet; remove filesystem.hide for --backend k8s",
    ("filesystem", "mounts"): "host paths cannot be mounted into a cluster Pod; commit the files "
    "to the repository, or remove filesystem.mounts for --backend k8s",
    ("network", "podman_network"): "a Podman network means nothing on a cluster; remove it for "
    "--backend k8s",
    ("git", "auto_commit"): "the cluster's finishing step always commits the agent's work; "
    "remove git.auto_commit: false for --backend k8s",
    ("git", "push_timeout"): _NOT_YET,
    ("git", "commit_message"): _NOT_YET,
    ("git", "co_authors"): _NOT_YET,
    ("git", "committer"): _NOT_YET,
    ("git", "commit_exclude"): _NOT_YET,
    ("git", "commit_agent_state"): _NOT_YET,
    ("git", "max_file_size"): _NOT_YET,
    ("git", "post_push_hook"): "a command run on this machine after the push cannot run for a "
    "cluster run; remove it for --backend k8s",
    ("environment", "passthrough"): "host variables do not reach a cluster; " + _SECRET_FIX,
    ("environment", "keychain"): "this machine's keychain does not reach a cluster; " + _SECRET_FIX,
    ("audit", "enabled"): "a cluster run's audit trail cannot be turned off; remove "
    "audit.enabled: false for --backend k8s",
    ("ssh",): _NOT_YET,
    ("build_tools",): _NOT_YET,
}


@dataclass(frozen=True)
class GitFacts:
    """What a cluster run needs to know about the project's repository."""

    url: str
    current_branch: str | None
    # Commits on the current branch that the remote-tracking branch lacks (None: no such ref).
    unpushed: int | None = None


@dataclass(frozen=True)
class Submission:
    """What ``kapsis run --backend k8s`` creates: the request and, for --spec, its task."""

    agent_id: str
    namespace: str | None  # None: the kubeconfig context's
    context: str | None
    spec: AgentRequestSpec
    task_text: str | None  # the --spec content, for the ConfigMap; None for an inline task
    task_summary: str
    project: str
    notes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.agent_id

    @property
    def task_config_map(self) -> str:
        return names.task_config_map_name(self.agent_id)

    def agent_request(self, namespace: str) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {
                "name": self.name,
                "namespace": namespace,
                "labels": {names.MANAGED_BY_LABEL: names.MANAGED_BY_VALUE},
            },
            "spec": self.spec.model_dump(mode="json", exclude_none=True),
        }

    def config_map(self, namespace: str) -> dict[str, Any] | None:
        if self.task_text is None:
            return None
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.task_config_map,
                "namespace": namespace,
                "labels": {
                    names.MANAGED_BY_LABEL: names.MANAGED_BY_VALUE,
                    names.REQUEST_LABEL: self.name,
                },
            },
            "data": {TASK_KEY: self.task_text},
        }

    def manifests(self, namespace: str) -> list[dict[str, Any]]:
        """The objects in creation order (the task first, so the Pod never waits for it)."""
        config_map = self.config_map(namespace)
        return [*([config_map] if config_map else []), self.agent_request(namespace)]


def read_git_facts(project: Path, remote: str, remote_origin: str) -> GitFacts:
    """The remote's URL and the checked-out branch; the repository is only read."""
    repo = Repo.discover(project)
    if repo is None or repo.root.resolve() != project.resolve():
        raise ConfigError(
            f"PROJECT {project}: a cluster run clones the project's git remote, and this is not "
            "the top level of a git repository; pass the repository's top level"
        )
    found = repo.run("remote", "get-url", remote, check=False)
    if found.returncode != 0:
        raise ConfigError(
            f"{remote_origin}: git.remote: the project has no remote {remote!r} for the cluster "
            f"to clone; add one (`git remote add {remote} URL`) or set git.remote"
        )
    url = found.stdout.decode().strip()
    head = repo.run("symbolic-ref", "--quiet", "--short", "HEAD", check=False)
    branch = head.stdout.decode().strip() if head.returncode == 0 else None
    unpushed = None
    if branch is not None and repo.rev(f"refs/remotes/{remote}/{branch}") is not None:
        counted = repo.run(
            "rev-list", "--count", f"refs/remotes/{remote}/{branch}..HEAD", check=False
        )
        if counted.returncode == 0:
            unpushed = int(counted.stdout.decode().strip() or 0)
    return GitFacts(url=url, current_branch=branch, unpushed=unpushed)


def check_clone_url(url: str, remote: str) -> str:
    """The remote URL if a cluster can clone it and it carries no credentials: what the
    operator's renderer (:func:`kapsis.k8s.render_network.git_remote`) will accept."""
    from kapsis.k8s.render_network import git_remote

    scp_like = "://" not in url and ":" in url.split("/", 1)[0]
    parts = urlsplit(url)
    if not scp_like and (parts.scheme not in ("https", "http", "ssh") or not parts.hostname):
        raise ConfigError(
            f"git.remote: the remote {remote!r} is {url!r}, which a cluster cannot clone (a path "
            "on this machine, or not https, http or ssh); set git.remote to a remote with an "
            "https or ssh URL"
        )
    if not scp_like and parts.password:
        raise ConfigError(
            f"git.remote: the URL of remote {remote!r} holds a password or token, which would be "
            "readable in the AgentRequest; remove it from the URL and put it in a Secret named "
            "by kubernetes.credentials_secret"
        )
    try:
        git_remote(url)
    except ConfigError as error:
        reason = str(error).removeprefix("workspace.git.url: ")
        raise ConfigError(f"git.remote: the remote {remote!r}: {reason}") from None
    return url


def refuse_local_only(loaded: LoadedConfig) -> None:
    """Raise a ConfigError for the first key set to something a cluster run cannot honour."""
    defaults = KapsisConfig()
    for path, fix in LOCAL_ONLY.items():
        value = _value_at(loaded.config, path)
        if value == _value_at(defaults, path):
            continue
        dotted = ".".join(str(part) for part in path)
        first = next(iter(value), "NAME") if isinstance(value, dict | list) else "NAME"
        if isinstance(first, str):
            fix = fix.replace("{name}", first)
        raise ConfigError(f"{loaded.origin_of(path)}: {dotted}: {fix}")


def _value_at(config: KapsisConfig, path: KeyPath) -> Any:
    return reduce(lambda node, key: getattr(node, str(key)), path, config)


def build_submission(
    request: RunRequest,
    loaded: LoadedConfig,
    profile: AgentProfile,
    git: GitFacts,
    agent_id: str,
) -> Submission:
    """The AgentRequest for ``request``: the same meaning as a local run of the same input."""
    config = loaded.config
    refuse_local_only(loaded)
    check_agent_id(agent_id)
    if agent_id.endswith("-"):
        raise ConfigError(
            f"--agent-id {agent_id!r}: it names the AgentRequest, and Kubernetes names end with "
            "a letter or digit"
        )
    if profile.source != "builtin":
        raise ConfigError(
            f"--agent {profile.name}: this profile comes from {profile.source}, a file the "
            "cluster does not have; use a built-in profile (with agent.command and --image)"
        )
    task_text, spec_source = task_of(request)
    if spec_source is None and not fits_one_string(f"KAPSIS_TASK={task_text}"):
        raise ConfigError(
            "--task is too long for the agent's environment; put it in a file and pass --spec FILE"
        )
    command = None
    if config.agent.command is not None:
        command = list(agent_command(config.agent.command, task_text))

    secrets = {
        name: SecretKeyRef(name=ref.name, key=ref.key)
        for name, ref in config.kubernetes.secrets.items()
    }
    login = profile.login
    logged_in = login is not None and login.secret in secrets
    for name in profile.secrets:
        if logged_in and login is not None and name in login.replaces:
            continue
        if name not in secrets and name not in config.environment.set:
            raise ConfigError(
                f"agent '{profile.name}' needs the secret {name}; on a cluster it comes from a "
                f"Secret: add `kubernetes.secrets.{name}: {{name: SECRET, key: KEY}}` to "
                "agent-sandbox.yaml"
                + (f" (or the subscription login {login.secret})" if login else "")
            )

    remote = config.git.remote
    url = check_clone_url(git.url, remote)
    base_origin = str(loaded.origin_of(("git", "base_branch")))
    base = config.git.base_branch or git.current_branch
    if base is None:
        raise ConfigError(
            "the project has no branch checked out (a detached HEAD), so there is no base branch "
            "for the cluster to start from; pass --base-branch NAME"
        )
    check_branch_name(base, base_origin)
    branch_origin = str(loaded.origin_of(("git", "branch")))
    branch = (
        check_branch_name(config.git.branch, branch_origin)
        if config.git.branch
        else auto_branch_name(task_text, agent_id)
    )
    notes: list[str] = []
    if config.git.base_branch is None and git.unpushed:
        notes.append(
            f"{git.unpushed} commit(s) on {base} are not on {remote}/{base}; the cluster starts "
            f"from {remote}'s {base} (push first to include them)"
        )
    elif config.git.base_branch is None and git.unpushed is None:
        notes.append(
            f"{base} has no {remote}/{base} here; the cluster clones {base} from {remote}, "
            "which fails if it was never pushed"
        )

    network = NetworkPolicySection.model_validate(
        config.network.model_dump(exclude={"podman_network", "ca_bundle"})
    )
    if request.allow:
        hosts = list(network.allowlist.hosts)
        addresses = list(network.allowlist.addresses)
        for entry in request.allow:
            value, is_address = check_flag_entry(entry)
            (addresses if is_address else hosts).append(value)
        allowlist = network.allowlist.model_copy(update={"hosts": hosts, "addresses": addresses})
        network = network.model_copy(update={"allowlist": allowlist})

    image = None if loaded.origin_of(("image", "name")).kind == "default" else config.image.name
    task = (
        TaskSpec(inline=task_text)
        if spec_source is None
        else TaskSpec(
            configMapRef=ConfigMapKeyRef(name=names.task_config_map_name(agent_id), key=TASK_KEY)
        )
    )
    spec = AgentRequestSpec(
        agent=AgentSpec(
            profile=profile.name,
            image=image,
            command=command,
            args=config.agent.args,
            endpoint=config.agent.endpoint,
            model=config.agent.model,
        ),
        task=task,
        workspace=WorkspaceSpec(
            git=GitWorkspace(
                url=url,
                branch=branch,
                baseBranch=base,
                push=config.git.auto_push,
                credentialsSecret=config.kubernetes.credentials_secret,
            )
        ),
        network=network,
        security=config.security,
        resources=ResourcesSpec.model_validate(config.resources.model_dump()),
        environment=EnvironmentSpec(set=dict(config.environment.set), secrets=secrets),
        caBundle=_ca_bundle(loaded),
    )
    return Submission(
        agent_id=agent_id,
        namespace=config.kubernetes.namespace,
        context=config.kubernetes.context,
        spec=spec,
        task_text=task_text if spec_source is not None else None,
        task_summary=task_summary(task_text, spec_source),
        project=str(request.project.expanduser().resolve()),
        notes=tuple(notes),
    )


def _ca_bundle(loaded: LoadedConfig) -> CaBundleSpec | None:
    """network.ca_bundle read here, on the submitting machine: its certificates travel in the
    request (the Pod cannot mount a file of this machine)."""
    source = bundle_file(loaded)
    if source is None:
        return None
    return CaBundleSpec(inline=bundle_text(source, MAX_CA_BUNDLE))
