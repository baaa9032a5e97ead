"""Command definitions. Each command parses flags, calls the API, and renders the result.

Errors from the API are printed as one line on stderr (``kapsis: error: ...``) and turned into
the documented exit code; nothing here decides policy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from typer.main import get_command

from kapsis.cli.audit_commands import audit_app
from kapsis.cli.common import (
    AgentOption,
    AllowOption,
    ConfigOption,
    JsonFlag,
    NetworkModeOption,
    RawFlag,
    fail as _fail,
    note as _note,
)
from kapsis.cli.inspect_commands import agents_app, config_app, policy_app
from kapsis.cli.operator_commands import operator_app
from kapsis.cli.server_commands import server_app
from kapsis.cli.ssh_commands import ssh_app
from kapsis.cli.trust_commands import trust_command
from kapsis.errors import ExitCode, KapsisError
from kapsis.terminal import shown

if TYPE_CHECKING:
    from collections.abc import Callable

    from kapsis.k8s.submission import Submission
    from kapsis.sandbox.launcher import RunResult
    from kapsis.sandbox.plan import RunRequest, SandboxPlan

app = typer.Typer(
    name="kapsis",
    help="Run AI coding agents in hardened sandboxes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(config_app, name="config")
app.add_typer(agents_app, name="agents")
app.add_typer(policy_app, name="policy")
app.add_typer(audit_app, name="audit")
app.add_typer(ssh_app, name="ssh")
app.add_typer(operator_app, name="operator")
app.add_typer(server_app, name="server")
app.command("trust")(trust_command)


ProjectArg = Annotated[Path, typer.Argument(help="The project folder the agent works on.")]


@app.command()
def run(
    project: ProjectArg,
    task: Annotated[str | None, typer.Option("--task", "-t", help="The task, as text.")] = None,
    spec: Annotated[
        Path | None, typer.Option(help="A Markdown task file (seen at /task-spec.md).")
    ] = None,
    agent: AgentOption = None,
    agent_id: Annotated[
        str | None, typer.Option("--agent-id", help="Id for this agent (default: random).")
    ] = None,
    network_mode: NetworkModeOption = None,
    security_profile: Annotated[
        str | None,
        typer.Option("--security-profile", help="minimal | standard | strict | paranoid"),
    ] = None,
    memory: Annotated[str | None, typer.Option(help="Memory limit, e.g. 2g.")] = None,
    cpus: Annotated[float | None, typer.Option(help="CPU limit in cores.")] = None,
    timeout: Annotated[str | None, typer.Option(help="Time limit, e.g. 30m.")] = None,
    disk: Annotated[
        str | None,
        typer.Option(help="What the agent may write to its workspace and each tmpfs, e.g. 2g."),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="The model the agent uses (agent.model), e.g. gpt-5.")
    ] = None,
    image: Annotated[str | None, typer.Option(help="Container image.")] = None,
    branch: Annotated[
        str | None,
        typer.Option(help="The agent's branch (default kapsis/<task>-<id>); existing: continue."),
    ] = None,
    base_branch: Annotated[
        str | None,
        typer.Option("--base-branch", help="Where a new branch starts (default: checked out)."),
    ] = None,
    mode: Annotated[
        str | None, typer.Option("--mode", help="Workspace: overlay | worktree.")
    ] = None,
    push: Annotated[
        bool | None,
        typer.Option("--push/--no-push", help="Push the branch after a successful run."),
    ] = None,
    allow: AllowOption = None,
    config: ConfigOption = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Start and return; see `kapsis status`.")
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON on stdout.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the plan and podman commands (k8s: the AgentRequest YAML); run nothing.",
        ),
    ] = False,
    backend: Annotated[
        str,
        typer.Option(
            "--backend", help="podman (this machine) | k8s (an AgentRequest on a cluster)."
        ),
    ] = "podman",
    namespace: Annotated[
        str | None,
        typer.Option("--namespace", "-n", help="k8s: the namespace (default: the context's)."),
    ] = None,
) -> None:
    """Run an agent on PROJECT in a sandbox."""
    from kapsis import api
    from kapsis.sandbox.plan import RunRequest

    request = RunRequest(
        project=project,
        task=task,
        spec=spec,
        agent=agent,
        agent_id=agent_id,
        network_mode=network_mode,
        security_profile=security_profile,
        memory=memory,
        cpus=cpus,
        timeout=timeout,
        disk=disk,
        model=model,
        image=image,
        branch=branch,
        base_branch=base_branch,
        mode=mode,
        push=push,
        allow=tuple(allow or ()),
        config_file=config,
        backend=backend,
        namespace=namespace,
    )
    if backend == "k8s":
        _run_k8s(request, detach=detach, json_output=json_output, dry_run=dry_run)
    try:
        plan = api.plan(request)
        if dry_run:
            from kapsis.backends import get_backend

            commands = get_backend().describe(plan)
            print(
                json.dumps({"plan": plan.model_dump(mode="json"), "commands": commands}, indent=2)
            )
            return
        _announce(plan)
        stdout = sys.stdout
        if json_output:
            # Keep stdout for the JSON result; the agent's output goes to stderr.
            stdout = os.fdopen(os.dup(1), "w")
            os.dup2(2, 1)
        result = api.launch(plan, detach=detach)
    except KapsisError as error:
        _fail(error)
    if json_output:
        print(json.dumps(dataclasses.asdict(result)), file=stdout, flush=True)
        raise typer.Exit(result.exit_code)
    _report(result)


def _report(result: RunResult) -> NoReturn:
    for line in result.notes:
        _note(line)
    if result.pr_url:
        _note(f"pull request: {result.pr_url}")
    if result.detached:
        _note(
            f"agent {result.agent_id} started; "
            f"follow it with `kapsis logs {result.agent_id} --follow`"
        )
    elif result.ok:
        _note(f"agent {result.agent_id}: {result.message}")
    else:
        _note(f"agent {result.agent_id} failed ({result.error_type}): {result.message}")
    raise typer.Exit(result.exit_code)


def _run_k8s(request: RunRequest, *, detach: bool, json_output: bool, dry_run: bool) -> NoReturn:
    """``kapsis run --backend k8s``: create the AgentRequest and follow it (or print it)."""
    from kapsis import api
    from kapsis.k8s import status_view

    agent_id = request.agent_id or "ID"
    try:
        submission = api.k8s_submission(request)
        agent_id = submission.agent_id
        if dry_run:
            from ruamel.yaml import YAML

            yaml = YAML(typ="safe", pure=True)
            yaml.default_flow_style = False
            yaml.dump_all(submission.manifests(api.k8s_namespace(submission)), sys.stdout)
            raise typer.Exit(0)
        result = api.k8s_run(
            submission,
            detach=detach,
            on_created=_announce_k8s,
            on_status=lambda status: _note(
                f"agent {submission.agent_id}: {status_view.describe(status)}"
            ),
        )
    except KeyboardInterrupt:
        # The request is the cluster's now: leaving the terminal must not stop or delete it.
        _note(
            f"no longer following agent {agent_id}; once created it keeps running on the "
            f"cluster: see `kapsis status {agent_id}`, stop it with `kapsis stop {agent_id}`"
        )
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    except KapsisError as error:
        _fail(error)
    if json_output:
        print(json.dumps(dataclasses.asdict(result)), flush=True)
        raise typer.Exit(result.exit_code)
    _report(result)


def _announce_k8s(submission: Submission, namespace: str) -> None:
    spec = submission.spec
    _note(
        f"agent {submission.agent_id} ({spec.agent.profile}) on {submission.project}: "
        f"AgentRequest {namespace}/{submission.name} created, profile {spec.security.profile}, "
        f"network {spec.network.mode}, memory {spec.resources.memory}, "
        f"cpus {spec.resources.cpus:g}"
    )
    if spec.network.mode == "open":
        _note("WARNING: network mode OPEN: the agent can reach any address")
    git = spec.workspace.git
    _note(f"branch {git.branch} from {git.baseBranch} of {git.url}")
    for line in submission.notes:
        _note(line)


def _announce(plan: SandboxPlan) -> None:
    limits = plan.resources
    _note(
        f"agent {plan.agent_id} ({plan.agent}) on {plan.project}: profile {plan.security.profile}, "
        f"network {plan.network.mode}, memory {limits.memory}, cpus {limits.cpus:g}, "
        f"pids {limits.pids_limit or 'podman default'}, disk {limits.disk or 'unlimited'}"
    )
    if limits.disk and not limits.disk_enforced:
        _note(
            f"WARNING: the workspace's disk limit is NOT enforced ({limits.disk_not_enforced}); "
            "the tmpfs mounts are limited"
        )
    if not limits.limits_enforced:
        _note(
            "WARNING: resource limits are NOT enforced on this host "
            "(rootless podman on cgroup v1); memory, cpu and pids limits are ignored"
        )
    if plan.network.mode == "open":
        _note("WARNING: network mode OPEN: the agent can reach any address")
    git = plan.git
    if git.branch:
        where = f"continuing {git.branch}" if git.resume else f"new branch {git.branch}"
        start = (git.start_commit or "")[:12]
        _note(f"{where} from {git.base} ({start}), workspace: {plan.workspace.mode}")
        if git.carried_commit:
            _note(
                f"your uncommitted changes ({git.carried_paths} path(s)) are carried as commit "
                f"{git.carried_commit[:12]}, before the agent's work (filesystem.uncommitted: "
                "include)"
            )
        elif git.left_out_paths:
            _note(
                f"your uncommitted changes ({git.left_out_paths} path(s)) are left out "
                "(filesystem.uncommitted: exclude)"
            )
        if plan.workspace.base is not None and not plan.workspace.base_exists:
            _note(
                f"first launch on this project or after a large change: checking out a frozen "
                f"base of {(plan.workspace.base_commit or '')[:12]} (as long as a checkout; "
                "later launches reuse it)"
            )
        for shared in plan.workspace.shared:
            _note(f"{shared.path}: shared read-only and live from your checkout (share_ignored)")


@app.command()
def status(
    agent_id: Annotated[str | None, typer.Argument(help="One agent (default: all).")] = None,
    json_output: JsonFlag = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Live table until Ctrl-C.")] = False,
) -> None:
    """Show the status of agents."""
    from kapsis import api
    from kapsis.cli import render

    try:
        if watch:
            render.watch_status(lambda: api.status(agent_id))
            return
        records = api.status(agent_id)
    except KapsisError as error:
        _fail(error)
    if json_output:
        payload = [r.model_dump(mode="json") for r in records]
        print(json.dumps(payload[0] if agent_id else payload, indent=2))
        return
    render.print_status(records)


@app.command()
def logs(
    agent_id: Annotated[str, typer.Argument(help="The agent.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the agent ends.")
    ] = False,
    raw: RawFlag = False,
) -> None:
    """Print an agent's transcript (its stdout and stderr); control characters are escaped
    visibly unless --raw."""
    from kapsis import api

    try:
        for line in api.logs(agent_id, follow=follow):
            print(line if raw else shown(line), flush=follow)
    except KapsisError as error:
        _fail(error)


@app.command()
def stop(agent_id: Annotated[str, typer.Argument(help="The agent.")]) -> None:
    """Stop a running agent."""
    from kapsis import api

    try:
        record = api.stop(agent_id)
    except KapsisError as error:
        _fail(error)
    _note(f"agent {agent_id}: {record.phase}: {record.message}")


@app.command()
def cleanup(
    all_agents: Annotated[
        bool, typer.Option("--all", help="Also stop and remove running agents.")
    ] = False,
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be removed.")] = False,
    branches: Annotated[
        bool, typer.Option("--branches", help="Also delete the agents' pushed local branches.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Also remove unsaved work and unpushed branches."),
    ] = False,
) -> None:
    """Remove finished agents' sandboxes, worktrees, transcripts and status (audit logs stay)."""
    from kapsis import api

    try:
        items = api.cleanup(
            agent,
            everything=all_agents,
            dry_run=dry_run,
            branches=branches,
            force=force,
        )
    except KapsisError as error:
        _fail(error)
    verb = "would remove" if dry_run else "removed"
    for item in items:
        if item.kept:
            print(shown(f"kept {item.agent_id} ({item.phase}): {item.kept}"))
            continue
        if item.problems:
            print(f"could not remove all of {item.agent_id} ({item.phase}):", file=sys.stderr)
            for problem in item.problems:
                print(f"  {shown(problem)}", file=sys.stderr)
            continue
        print(shown(f"{verb} {item.agent_id} ({item.phase}): {', '.join(item.removes)}"))
    if not items:
        print("nothing to clean up")
    if any(item.problems for item in items):
        raise typer.Exit(int(ExitCode.SANDBOX_FAILED))


@app.command()
def setup(
    check: Annotated[
        bool, typer.Option("--check", help="Report what the host lacks, with fixes.")
    ] = False,
    build: Annotated[
        bool, typer.Option("--build", help="Build the base and gateway images locally.")
    ] = False,
    agents: Annotated[
        str | None,
        typer.Option(
            "--agents",
            help="Also build agent images, e.g. claude,codex,aider,gemini (with --build: "
            "rebuild them; without: build the missing ones).",
        ),
    ] = None,
    operator: Annotated[
        bool,
        typer.Option(
            "--operator",
            help="Also build the Kubernetes operator image (localhost/kapsis-operator:latest).",
        ),
    ] = False,
    registry: Annotated[
        str | None,
        typer.Option(
            "--registry",
            help="Tag the Kapsis images as REGISTRY/NAME:TAG and print the `podman push` "
            "commands (nothing is pushed).",
        ),
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Check the host and build the images (without flags: build what is missing, then check)."""
    from kapsis.cli import render
    from kapsis.config.models import DEFAULT_IMAGE
    from kapsis.host import checks, gateway_image, image
    from kapsis.sandbox.network_plan import DEFAULT_GATEWAY_IMAGE

    try:
        wanted: list[str] = []
        if agents is not None:
            from kapsis.host import agent_images

            wanted = agent_images.parse_agents(agents)
        # Without flags: build only what is missing. The gateway is built on the base image.
        build_base = build or (not check and not image.image_present(DEFAULT_IMAGE))
        if build_base:
            image.build_base_image(DEFAULT_IMAGE, progress=_note)
        if build_base or (not check and not image.image_present(DEFAULT_GATEWAY_IMAGE)):
            gateway_image.build_gateway_image(progress=_note)
        if wanted:
            # Agent images sit on the base image: a rebuilt base means rebuilt agents.
            if build or build_base:
                todo = wanted
            else:
                todo = [] if check else agent_images.missing_agents(wanted)
            for agent in todo:
                agent_images.build_agent_image(agent, progress=_note)
        if operator or registry:
            from kapsis.host import operator_image

            if operator and (
                build
                or build_base
                or not image.image_present(operator_image.DEFAULT_OPERATOR_IMAGE)
            ):
                operator_image.build_operator_image(progress=_note)
            if registry:
                from kapsis.host.agent_images import agent_image

                images = [
                    DEFAULT_IMAGE,
                    DEFAULT_GATEWAY_IMAGE,
                    operator_image.DEFAULT_OPERATOR_IMAGE,
                ]
                images += [agent_image(agent) for agent in wanted]
                for command in operator_image.tag_for_registry(images, registry, _note):
                    print(command)
        results = checks.run_checks(DEFAULT_IMAGE)
    except KapsisError as error:
        _fail(error)
    report = checks.checks_as_json(results, DEFAULT_IMAGE)
    if json_output:
        print(json.dumps(report, indent=2))
    else:
        render.print_checks(results, DEFAULT_IMAGE)
    raise typer.Exit(0 if report["ok"] else int(ExitCode.HOST_UNSUPPORTED))


@functools.cache
def click_command() -> Callable[..., object]:
    """The click command tree of ``app``: typer builds it from the function signatures on every
    call (~50 ms); it depends only on the code, so it is built once per process (the start-up
    server builds it before it forks)."""
    return get_command(app)


def main(prog_name: str | None = None) -> None:
    # Not ``app()``: that rebuilds the tree; what it adds (pretty tracebacks) the app turns off.
    click_command()(prog_name=prog_name)
