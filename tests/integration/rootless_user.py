"""A throwaway non-root user for the rootless tests, made and removed by the test session.

The user gets what a normal user on a laptop has, and nothing of root's: an account with a home
of its own, subordinate uid/gid ranges (``useradd`` allocates free ones from /etc/login.defs),
a runtime directory (``/run/user/UID``, as logind would make it), podman storage in its home
with the overlay driver, and the Kapsis images loaded into that storage from root's (what
``kapsis setup`` as that user would build; loading takes seconds, building a minute). Kapsis
runs as the user with the system's ``python3`` and the project's code on ``PYTHONPATH``; when
the checkout is out of the user's reach (under /root, say) the code is copied into the user's
home first.

Two host settings that rootless podman needs and these machines lack are made for the session
and put back at the end: ``/dev/net/tun`` usable by everyone (slirp4netns opens it as the user;
distributions ship it 0666) and ``/`` a shared mount (systemd makes it so at boot). At the end
every process of the user is killed and ``userdel --remove`` takes the account, its ranges and
its home.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import kapsis

STORAGE_CONF = '[storage]\ndriver = "overlay"\n'
SYSTEM_PYTHON = "/usr/bin/python3"
SOURCE_DIR = Path(kapsis.__file__).resolve().parent.parent  # .../src


@dataclass
class RootlessUser:
    name: str
    uid: int
    gid: int
    home: Path
    runtime_dir: Path
    python_path: str

    def environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A login-like environment: nothing of root's (its HOME, config or runtime dirs)."""
        return {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "LANG": "C.UTF-8",
            "PYTHONPATH": self.python_path,
            "PYTHONDONTWRITEBYTECODE": "1",
            **(extra or {}),
        }

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        timeout: float = 180,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` as the user (runuser: no password, no PAM session of root's)."""
        return subprocess.run(
            ["runuser", "-u", self.name, "--", "env", "-i", *_env_args(self.environment(env)),
             *argv],
            cwd=cwd or self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )  # fmt: skip

    def kapsis(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run([SYSTEM_PYTHON, "-m", "kapsis", *args], **kwargs)  # type: ignore[arg-type]

    def make_repository(self, root: Path) -> Path:
        """A repository of the user's at ``root``, branch main, one commit (base.txt)."""
        script = (
            f"mkdir -p {root} && cd {root} && git init -q -b main"
            " && git config user.name 'Rootless User' && git config user.email user@example.test"
            " && echo base > base.txt && git add base.txt && git commit -q -m init"
        )
        made = self.run(["sh", "-c", script])
        if made.returncode != 0:
            raise RuntimeError(f"git init as {self.name} failed: {made.stderr.strip()}")
        return root

    def not_owned(self, *roots: Path) -> list[str]:
        """Files under ``roots`` that are not the user's (and any that the user cannot read)."""
        found = self.run(["find", *map(str, roots), "-not", "-user", self.name])
        return found.stdout.splitlines() + found.stderr.splitlines()

    def podman(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return self.run(["podman", *args], timeout=timeout)


def _env_args(env: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in env.items()]


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "making a throwaway user needs root"
    for tool in ("useradd", "userdel", "runuser", "podman", "newuidmap"):
        if shutil.which(tool) is None:
            return f"the rootless tests need {tool!r} (scripts/install.sh installs it)"
    if not Path(SYSTEM_PYTHON).is_file():
        return f"the rootless tests run Kapsis with {SYSTEM_PYTHON}, which is missing"
    wanted = "{}.{}".format(*sys.version_info[:2])
    check = subprocess.run(
        [
            SYSTEM_PYTHON,
            "-c",
            f"import sys; sys.exit('%d.%d' % sys.version_info[:2] != '{wanted}')",
        ],
        check=False,
    )
    if check.returncode != 0:
        return f"{SYSTEM_PYTHON} is not Python {wanted}, the venv's (its compiled packages)"
    return None


@contextlib.contextmanager
def host_settings_for_rootless() -> Iterator[None]:
    """/dev/net/tun open to users and ``/`` shared for the session; both put back after."""
    tun = Path("/dev/net/tun")
    mode = tun.stat().st_mode & 0o777 if tun.exists() else None
    propagation = _root_propagation()
    try:
        if mode is not None and mode != 0o666:
            tun.chmod(0o666)
        if propagation != "shared":
            subprocess.run(["mount", "--make-rshared", "/"], check=True)
        yield
    finally:
        if mode is not None and mode != 0o666:
            tun.chmod(mode)
        if propagation == "private":
            subprocess.run(["mount", "--make-rprivate", "/"], check=False)


def _root_propagation() -> str:
    result = subprocess.run(
        ["findmnt", "-n", "-o", "PROPAGATION", "/"], capture_output=True, text=True, check=False
    )
    return result.stdout.strip()


@contextlib.contextmanager
def rootless_user(images: Sequence[str]) -> Iterator[RootlessUser]:
    """A fresh user with its own podman storage holding ``images``; removed afterwards."""
    name = f"kapsis-t{secrets.token_hex(3)}"
    base = Path(tempfile.mkdtemp(prefix="kapsis-rootless-"))
    base.chmod(0o755)
    home = base / "home"
    subprocess.run(
        ["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/sh",
         "--user-group", name],
        check=True, capture_output=True,
    )  # fmt: skip
    entry = pwd.getpwnam(name)
    runtime = Path("/run/user") / str(entry.pw_uid)
    try:
        _check_ranges(name)
        runtime.mkdir(parents=True, exist_ok=True)
        os.chown(runtime, entry.pw_uid, entry.pw_gid)
        runtime.chmod(0o700)
        user = RootlessUser(name, entry.pw_uid, entry.pw_gid, home, runtime, _code_for(name, home))
        config = home / ".config" / "containers"
        user.run(["mkdir", "-p", str(config)])
        user.run(["sh", "-c", f"cat > {config}/storage.conf"], input=STORAGE_CONF)
        if images:
            _load_images(user, images)
        yield user
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], check=False)
        for _ in range(50):
            if subprocess.run(["pgrep", "-u", name], capture_output=True).returncode != 0:
                break
            subprocess.run(["sleep", "0.1"], check=False)
        _remove_helper_disks(entry.pw_uid)
        subprocess.run(["userdel", "--remove", "--force", name], capture_output=True, check=False)
        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def _remove_helper_disks(uid: int) -> None:
    """The disks the disk helper made for the user (a test that failed half-way leaves them)."""
    from kapsis.workspace import disk_helper

    mounts = disk_helper.mounts_dir(disk_helper.STATE, uid)
    if mounts.is_dir():
        for mount in mounts.iterdir():
            subprocess.run(["umount", "--lazy", str(mount)], capture_output=True, check=False)
        shutil.rmtree(mounts, ignore_errors=True)
    shutil.rmtree(disk_helper.images_dir(disk_helper.STATE, uid), ignore_errors=True)


def _check_ranges(name: str) -> None:
    for path in ("/etc/subuid", "/etc/subgid"):
        lines = Path(path).read_text().splitlines()
        if not any(line.split(":")[0] == name for line in lines):
            raise RuntimeError(f"useradd gave {name} no range in {path} (SUB_UID_COUNT?)")


def _code_for(name: str, home: Path) -> str:
    """A PYTHONPATH the user can read: the project's and the venv's, or copies of them."""
    site = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    paths = [str(SOURCE_DIR), site]
    readable = subprocess.run(
        ["runuser", "-u", name, "--", "test", "-r", f"{SOURCE_DIR}/kapsis/__init__.py", "-a",
         "-x", site],
        check=False,
    )  # fmt: skip
    if readable.returncode == 0:
        return ":".join(paths)
    copies = []
    for index, path in enumerate(paths):
        target = home / ".kapsis-code" / str(index)
        shutil.copytree(path, target, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        copies.append(str(target))
    subprocess.run(["chown", "-R", f"{name}:{name}", str(home / ".kapsis-code")], check=True)
    return ":".join(copies)


def _load_images(user: RootlessUser, images: Sequence[str]) -> None:
    """Root's images into the user's storage (podman save | podman load as the user)."""
    archive = user.home / "images.tar"
    subprocess.run(
        ["podman", "save", "--quiet", "--multi-image-archive", "--output", str(archive), *images],
        check=True, capture_output=True,
    )  # fmt: skip
    os.chown(archive, user.uid, user.gid)
    loaded = user.podman("load", "--quiet", "--input", str(archive), timeout=300)
    archive.unlink()
    if loaded.returncode != 0:
        raise RuntimeError(f"podman load as {user.name} failed: {loaded.stderr.strip()}")
