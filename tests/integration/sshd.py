"""A real OpenSSH server in the test internet (see internet.py), for the SSH verification tests.

sshd runs in a container from :data:`SSH_IMAGE` (the base image plus openssh-server and
openssh-client from the Debian mirror; conftest.py has it built before the test internet
exists) that joins the test internet's network namespace, so it listens on 198.51.100.2:2222 -
a documentation address in a namespace this session made; nothing else is ever contacted. The
host keys are made by the test with ssh-keygen: the "legitimate" server's and a man in the
middle's. The server lets ``root`` in with the test's client key and serves git repositories
under ``/srv`` (a directory of the test).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kapsis.host.image import image_id

SSH_IMAGE = "localhost/kapsis-test-ssh:latest"
LABEL_BASE = "io.kapsis.test.base-id"  # the id of the base image it was built on
SSH_PORT = 2222
CONTAINERFILE = """\
FROM {base}
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
      openssh-server openssh-client \\
 && rm -rf /var/lib/apt/lists/* /etc/ssh/ssh_host_*
"""
SSHD_CONFIG = f"""\
Port {SSH_PORT}
PidFile none
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
AuthorizedKeysFile /keys/authorized_keys
"""


def ensure_ssh_image(base: str) -> str:
    """Build :data:`SSH_IMAGE` on ``base`` unless podman has one built on this very ``base``
    (about 15 s, needs the mirror): one left by an earlier session on another base is rebuilt."""
    base_id = image_id("podman", base)
    inspect = subprocess.run(
        [
            "podman",
            "image",
            "inspect",
            "--format",
            f'{{{{index .Labels "{LABEL_BASE}"}}}}',
            SSH_IMAGE,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if inspect.returncode == 0 and base_id and inspect.stdout.strip() == base_id:
        return SSH_IMAGE
    with tempfile.TemporaryDirectory(prefix="kapsis-ssh-image-") as context:
        (Path(context) / "Containerfile").write_text(CONTAINERFILE.format(base=base))
        result = subprocess.run(
            ["podman", "build", "--pull=never", "-q", "-t", SSH_IMAGE,
             "--label", f"{LABEL_BASE}={base_id}", context],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"building {SSH_IMAGE} failed: {result.stderr[-2000:]}")
    return SSH_IMAGE


def has_ssh_client(image: str) -> bool:
    result = subprocess.run(
        ["podman", "run", "--rm", "--network", "none", image, "sh", "-c", "command -v ssh"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    return result.returncode == 0


def keygen(path: Path) -> str:
    """A new ed25519 key pair at ``path``; returns the public key as 'TYPE BASE64'."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
    )
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


@dataclass
class SshServer:
    """An sshd in the test internet; :meth:`serve` (re)starts it with one of the host keys."""

    netns: str
    address: str
    keys: Path  # host keys, sshd_config, authorized_keys (mounted at /keys)
    srv: Path  # mounted at /srv: the git repositories
    image: str
    legit_key: str  # public host keys, 'TYPE BASE64'
    mitm_key: str
    client_key: Path  # the private key the server accepts
    name: str = f"kapsis-test-sshd-{os.getpid()}"

    def serve(self, host_key: str) -> None:
        """Run sshd with ``host_key`` ("legit" or "mitm"), replacing a running one."""
        self.stop()
        subprocess.run(
            [
                "podman", "run", "--detach", "--rm", "--name", self.name, "--pull", "never",
                "--network", f"ns:/run/netns/{self.netns}",
                "--volume", f"{self.keys}:/keys:ro", "--volume", f"{self.srv}:/srv",
                self.image, "sh", "-c",
                f"mkdir -p /run/sshd && exec /usr/sbin/sshd -D -e -f /keys/sshd_config "
                f"-h /keys/host_{host_key}",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.address, SSH_PORT), timeout=1) as sock,
            ):
                if sock.recv(64).startswith(b"SSH-2.0"):
                    return
            time.sleep(0.1)
        raise RuntimeError("sshd did not answer on port 2222 within 15 s")

    def stop(self) -> None:
        subprocess.run(
            ["podman", "rm", "--force", "--time", "0", "--ignore", self.name],
            capture_output=True,
            check=False,
            timeout=60,
        )


@contextlib.contextmanager
def ssh_server(netns: str, address: str, image: str, workdir: Path) -> Iterator[SshServer]:
    keys, srv = workdir / "keys", workdir / "srv"
    keys.mkdir(parents=True)
    srv.mkdir()
    legit, mitm = keygen(keys / "host_legit"), keygen(keys / "host_mitm")
    client = workdir / "client_key"
    (keys / "authorized_keys").write_text(keygen(client) + "\n")
    (keys / "sshd_config").write_text(SSHD_CONFIG)
    server = SshServer(netns, address, keys, srv, image, legit, mitm, client)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def ssh_agent(key: Path, workdir: Path, user: str | None = None) -> Iterator[str]:
    """An ssh-agent holding ``key``; yields its socket (for SSH_AUTH_SOCK). ``user``: the agent
    runs as that user (it serves only its own uid), and ``workdir`` and ``key`` must be theirs."""
    sock = workdir / "agent.sock"
    as_user = ["runuser", "-u", user, "--"] if user else []
    agent = subprocess.Popen(
        [*as_user, "ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("ssh-agent did not start")
            time.sleep(0.05)
        subprocess.run(
            [*as_user, "env", f"SSH_AUTH_SOCK={sock}", "ssh-add", "-q", str(key)],
            env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
            check=True,
            capture_output=True,
        )
        yield str(sock)
    finally:
        agent.terminate()
        agent.wait(timeout=10)
