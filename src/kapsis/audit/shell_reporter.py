"""Runs the shell agent's task under bash with xtrace sent to the host's audit socket.

Mounted read-only into the sandbox at /run/kapsis/report-shell.py and started by the shell
profile when the socket and python3 are there. Each command bash runs is traced to the socket,
where the host records it as an agent-reported command: as typed (``$BASH_COMMAND``, quoted by
bash onto one line) and as expanded, ``+ 'rm -rf *'<TAB>rm -rf a b`` (a quoted form holds no raw
tab). The alert rules judge both: ``rm -rf *`` is ``rm -rf a b`` once expanded. Standard library
only.
"""

import os
import socket
import sys

SOCKET = os.environ.get("KAPSIS_AUDIT_SOCKET", "/run/kapsis/audit.sock")
TRACE_FD = 9


def main() -> None:
    task = sys.argv[1]
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(SOCKET)
        os.dup2(sock.detach(), TRACE_FD)
        os.environ["BASH_XTRACEFD"] = str(TRACE_FD)
        os.environ["PS4"] = "+ ${BASH_COMMAND@Q}\t"
        os.execvp("bash", ["bash", "-x", "-c", task])
    except OSError:
        os.execvp("sh", ["sh", "-c", task])  # no socket: run the task unreported


if __name__ == "__main__":
    main()
